"""Weight matching's tracked objective is the true objective after every group solve.

The solver proposes moves from LAP values and keeps a running objective; on every kind of group
(plain, flattened, fibred within-head dims, heads with several fibres that share a tensor as in
grouped-query attention, nested channel multipliers of grouped convs, a group on two axes of one
tensor) the running value must equal ``<A, pi(B)>`` recomputed from scratch with the current
permutations, after every solve, and the run must converge.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from autoperm import apply_permutation, infer_spec, random_permutation, weight_matching
from autoperm.solvers.result import is_cost_tensor

solver_module = sys.modules["autoperm.solvers.weight_matching"]


def _true_objective(spec, sd_a, sd_b, perms) -> float:
    permuted = apply_permutation(spec, perms, sd_b)
    return sum(
        float((sd_a[name].double() * permuted[name].double()).sum())
        for name in spec.members_by_param
        if is_cost_tensor(name, sd_a[name])
    )


def _checked_run(monkeypatch, spec, sd_a, sd_b, **kwargs):
    """Run weight matching, asserting the invariant after every group solve."""
    original = solver_module._CoordinateDescent.solve_group
    checks = []

    def checked(self, group):
        moved = original(self, group)
        true = _true_objective(spec, sd_a, sd_b, self.state.perms)
        assert self.value == pytest.approx(true, rel=1e-9, abs=1e-9), group.name
        checks.append(group.name)
        return moved

    monkeypatch.setattr(solver_module._CoordinateDescent, "solve_group", checked)
    result = weight_matching(spec, sd_a, sd_b, **kwargs)
    assert checks
    assert result.objective == pytest.approx(_true_objective(spec, sd_a, sd_b, result.perms), rel=1e-9)
    assert all(later >= earlier - 1e-9 * abs(earlier) for earlier, later in zip(result.history[1:], result.history[2:]))
    return result


class GroupedConvNet(nn.Module):
    """Channel-multiplier grouped convs twice in a row (PiT / FastViT downsampling), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.up1 = nn.Conv2d(6, 12, 3, padding=1, groups=6)
        self.up2 = nn.Conv2d(12, 24, 3, padding=1, groups=12)
        self.mix = nn.Conv2d(24, 24, 1)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.up1(x))
        x = torch.relu(self.up2(x))
        x = x + torch.relu(self.mix(x))
        return self.head(x.mean((2, 3)))


class SquareMix(nn.Module):
    """A residual stream that a square matrix maps to itself: one group on both axes of a tensor."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.mix = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + torch.tanh(h @ self.mix)
        return self.out(h)


def _llama(seed: int):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=97, use_cache=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def test_invariant_on_grouped_query_attention_independent_models(monkeypatch) -> None:
    model_a, model_b = _llama(0), _llama(1)
    spec = infer_spec(model_a, (torch.randint(0, 97, (1, 8)),))
    assert any(g.per for g in spec.active_groups)
    result = _checked_run(monkeypatch, spec, model_a.state_dict(), model_b.state_dict(), max_iter=30)
    assert result.converged and result.n_iter < 30


def test_invariant_and_recovery_on_grouped_query_attention_planted(monkeypatch) -> None:
    model = _llama(0)
    spec = infer_spec(model, (torch.randint(0, 97, (1, 8)),))
    sd_a = model.state_dict()
    sd_b = apply_permutation(spec, random_permutation(spec, seed=5), sd_a)
    result = _checked_run(monkeypatch, spec, sd_a, sd_b)
    aligned = apply_permutation(spec, result.perms, sd_b)
    assert all(torch.equal(aligned[k], sd_a[k]) for k in sd_a)


@pytest.mark.parametrize("planted", [True, False], ids=["planted", "independent"])
def test_invariant_on_nested_channel_multipliers(monkeypatch, planted: bool) -> None:
    torch.manual_seed(0)
    model_a = GroupedConvNet()
    spec = infer_spec(model_a, (torch.randn(1, 3, 6, 6),))
    assert sum(1 for g in spec.active_groups if g.per) >= 2  # two fibres over the stem's channels
    sd_a = model_a.state_dict()
    if planted:
        sd_b = apply_permutation(spec, random_permutation(spec, seed=2), sd_a)
    else:
        torch.manual_seed(1)
        sd_b = GroupedConvNet().state_dict()
    result = _checked_run(monkeypatch, spec, sd_a, sd_b)
    assert result.converged
    if planted:
        aligned = apply_permutation(spec, result.perms, sd_b)
        assert all(torch.equal(aligned[k], sd_a[k]) for k in sd_a)


def test_invariant_when_a_group_sits_on_both_axes_of_a_tensor(monkeypatch) -> None:
    torch.manual_seed(0)
    model_a, model_b = SquareMix(), SquareMix()
    spec = infer_spec(model_a, (torch.randn(2, 5),))
    assert any(sum(m.param == "mix" for m in g.members) == 2 for g in spec.active_groups)
    result = _checked_run(monkeypatch, spec, model_a.state_dict(), model_b.state_dict(), first_sweep="random")
    assert result.converged


def test_invariant_on_attention_heads_with_two_fibres(monkeypatch) -> None:
    torch.manual_seed(0)
    model_a = nn.MultiheadAttention(16, 4, batch_first=True)
    model_b = nn.MultiheadAttention(16, 4, batch_first=True)

    class Wrap(nn.Module):
        def __init__(self, attention: nn.Module) -> None:
            super().__init__()
            self.attention = attention

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attention(x, x, x, need_weights=False)[0]

    spec = infer_spec(Wrap(model_a), (torch.randn(1, 5, 16),))
    assert sum(1 for g in spec.active_groups if g.per) == 2
    _checked_run(monkeypatch, spec, Wrap(model_a).state_dict(), Wrap(model_b).state_dict())
