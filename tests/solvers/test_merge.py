"""merge_many: permuted copies of one model merge back into it; errors; both schemes."""

from __future__ import annotations

import pytest
import torch

from autoperm import SolverError, apply_permutation, random_permutation
from autoperm.solvers import merge_many, weight_matching
from tests._specs import MLP, ConvNet, convnet_spec, mlp_spec, train_briefly


def _permuted_copies(model, spec, count: int) -> list[dict[str, torch.Tensor]]:
    sd = model.state_dict()
    return [sd] + [apply_permutation(spec, random_permutation(spec, seed=10 + i), sd) for i in range(count - 1)]


@pytest.mark.parametrize("scheme", ["mergemany", "anchor"])
def test_permuted_copies_merge_back_into_the_model(scheme: str) -> None:
    torch.manual_seed(0)
    model = train_briefly(ConvNet(), torch.randn(16, 3, 8, 8))
    spec = convnet_spec(model)
    copies = _permuted_copies(model, spec, 4)

    merged = merge_many(spec, copies, method="wm", scheme=scheme)

    for name, tensor in model.state_dict().items():
        assert torch.equal(merged.state_dict[name], tensor) or torch.allclose(
            merged.state_dict[name], tensor, rtol=1e-6, atol=1e-7
        ), name
    assert merged.converged
    assert all(torch.equal(p, torch.arange(p.shape[0])) for p in merged.perms[0].values())
    for perms, sd in zip(merged.perms, copies):
        aligned = apply_permutation(spec, perms, sd)
        assert all(torch.equal(aligned[k], copies[0][k]) for k in sd)


def test_mergemany_beats_naive_averaging_on_independent_models() -> None:
    models = [MLP(16, 12, 2, 3) for _ in range(3)]
    spec = mlp_spec(models[0])
    sds = [m.state_dict() for m in models]
    merged = merge_many(spec, sds, method="wm", seed=1)
    assert merged.history == sorted(merged.history)
    # every aligned model is at least as close to the merge as its unaligned self to the naive mean
    naive = {k: torch.stack([sd[k] for sd in sds]).mean(0) for k in sds[0]}

    def spread(center, aligned_sds):
        return sum(float(((sd[k] - center[k]) ** 2).sum()) for sd in aligned_sds for k in center)

    aligned = [apply_permutation(spec, p, sd) for p, sd in zip(merged.perms, sds)]
    assert spread(merged.state_dict, aligned) < spread(naive, sds)


def test_anchor_scheme_matches_pairwise_weight_matching() -> None:
    models = [MLP(16, 8, 2, 3) for _ in range(3)]
    spec = mlp_spec(models[0])
    sds = [m.state_dict() for m in models]
    merged = merge_many(spec, sds, scheme="anchor")
    for k in (1, 2):
        pairwise = weight_matching(spec, sds[0], sds[k])
        assert all(torch.equal(merged.perms[k][g], pairwise.perms[g]) for g in pairwise.perms)


def test_bad_requests_raise_solver_errors() -> None:
    model = MLP(16, 8, 2, 3)
    spec = mlp_spec(model)
    sd = model.state_dict()
    with pytest.raises(SolverError, match="at least two"):
        merge_many(spec, [sd])
    with pytest.raises(SolverError, match="unknown merge method 'xx'"):
        merge_many(spec, [sd, sd], method="xx")
    with pytest.raises(SolverError, match="needs the model and data"):
        merge_many(spec, [sd, sd], method="ste")
    with pytest.raises(SolverError, match="anchor"):
        merge_many(spec, [sd, sd], method="ste", scheme="mergemany")
    broken = {k: v for k, v in sd.items() if k != "head.bias"}
    with pytest.raises(SolverError, match=r"#3 .*missing 'head.bias'"):
        merge_many(spec, [sd, sd, broken])
