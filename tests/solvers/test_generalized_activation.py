"""Generalised activation matching and `align(method="act")`: planted recovery, soundness, the CLI, in float64."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import autoperm
from autoperm.cli import cli
from autoperm.solvers.generalized import procrustes
from autoperm.solvers.generalized_activation import generalized_activation_matching, observation_sites
from autoperm.spec import apply_transform, random_transform
from autoperm.trace import GraphRunner
from tests.solvers.test_generalized import TinyTransformer, _model, _relative_error, _state, independent_pair

MODEL = ["tests.solvers.test_generalized:TinyTransformer", "--kwargs", "heads=2", "--kwargs", "norm='layer'",
         "--input-shape", "2,5,3"]


def token_data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(64, 5, 3)`` inputs (targets unused): the data of the CLI test (``--data``)."""
    generator = torch.Generator().manual_seed(11)
    return torch.randn(64, 5, 3, generator=generator).to(dtype), torch.zeros(64, dtype=torch.long)


def _canonical_pair(seed: int, kinds: list[str] | None, **options) -> tuple:
    """A model, its spec, A in canonical form and B = a planted transform of A (float64)."""
    model, spec, inputs = _model(seed, **options)
    canonical, a = autoperm.canonicalize(spec, _state(model))
    planted = random_transform(canonical, seed=seed + 100, kinds=kinds)
    return model, spec, inputs, a, apply_transform(canonical, planted, a), planted


def _output(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model(inputs)


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("heads,activation,seed", [(2, "gelu", 0), (4, "relu", 1), (2, "relu", 2)])
def test_planted_orthogonal_stream_and_head_maps_are_recovered_from_activations(norm, heads, activation, seed):
    model, spec, inputs, a, b, planted = _canonical_pair(seed, ["permutation", "orthogonal"], heads=heads,
                                                         activation=activation, norm=norm)
    assert any(t.is_floating_point() for t in planted.values())  # an orthogonal stream and within-head maps
    expected = _output(model, b, inputs)
    runner = GraphRunner.for_spec(spec, model)
    result = autoperm.align(spec, a, b, symmetries="orthogonal", method="act", runner=runner,
                            data=token_data(torch.float64))
    assert result.method == "act"
    assert _relative_error(result.state_dict, a) < 1e-6
    assert torch.allclose(_output(model, result.state_dict, inputs), expected, atol=1e-10)  # B's function


@pytest.mark.parametrize("norm", ["rms", "layer"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_full_symmetries_recover_planted_invertible_and_scale_maps(norm, activation):
    model, spec, inputs, a, b, planted = _canonical_pair(3, None, heads=2, activation=activation, norm=norm)
    canonical = autoperm.canonicalize(spec, a)[0]
    assert {"invertible"} <= {canonical[name].kind for name in planted}
    expected = _output(model, b, inputs)
    result = autoperm.align(spec, a, b, symmetries="full", method="act", runner=GraphRunner.for_spec(spec, model),
                            data=token_data(torch.float64))
    assert _relative_error(result.state_dict, a) < 1e-6
    assert torch.allclose(_output(model, result.state_dict, inputs), expected, atol=1e-10)


def test_independent_models_keep_b_function_in_a_gauge():
    model, other, spec, inputs, a, b = independent_pair()
    expected = _output(other, b, inputs)
    for symmetries in ("orthogonal", "full"):
        result = autoperm.align(spec, a, b, symmetries=symmetries, method="act", runner=GraphRunner.for_spec(spec, model),
                                data=token_data(torch.float64))
        assert torch.allclose(_output(other, result.state_dict, inputs), expected, atol=1e-9)
        assert all(torch.equal(result.state_dict[k], t) for k, t in a.items() if ".ln" in k)  # A's gains and biases
        assert any(t.is_floating_point() for t in result.transforms.values())


def test_maps_found_from_activations_can_then_be_learned():
    model, spec, inputs = _model(12, heads=2, norm="layer")
    a, b = _state(model), _state(_model(13, heads=2, norm="layer")[0])
    expected = _output(model, b, inputs)
    data = (token_data(torch.float64)[0], torch.randn(64, 5, 4, dtype=torch.float64))
    result = autoperm.align(spec, a, b, symmetries="full", method="act", runner=GraphRunner.for_spec(spec, model), data=data,
                            model=model, steps=3, batch_size=32, loss_fn=torch.nn.functional.mse_loss)
    assert result.refined and len(result.losses) == 3
    assert torch.allclose(_output(model, result.state_dict, inputs), expected, atol=1e-9)


def test_the_stream_map_is_procrustes_on_the_cross_moment_of_its_writers():
    """An independent reference: the writers' outputs recorded by forward hooks, not through the spec."""
    model, spec, inputs = _model(4, heads=2, norm="rms")
    canonical, a = autoperm.canonicalize(spec, _state(model))
    _, b = autoperm.canonicalize(spec, _state(_model(5, heads=2, norm="rms")[0]))
    data = token_data(torch.float64)
    result = generalized_activation_matching(canonical, GraphRunner.for_spec(spec, model), a, b, data)
    stream = next(g for g in canonical.active_groups if any(m.param == "embed.weight" for m in g.members))
    writers = [model.embed] + [layer for block in model.blocks for layer in (block.o, block.down)]
    assert len(observation_sites(canonical, stream)) == len(writers)
    recorded: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(lambda module, _, out, i=i: recorded.setdefault(i, []).append(out.reshape(-1, out.shape[-1])))
             for i, layer in enumerate(writers)]
    for state_dict in (a, b):
        _output(model, state_dict, data[0])
    for hook in hooks:
        hook.remove()
    cost = sum(x.T @ y / x.shape[0] for x, y in recorded.values())
    assert torch.allclose(result.transforms[stream.name], procrustes(cost), atol=1e-9)


def test_groups_no_activation_shows_fall_back_to_weight_matching():
    model, spec, inputs, a, b, _ = _canonical_pair(6, ["permutation", "orthogonal"], heads=2, norm="rms")
    canonical = autoperm.canonicalize(spec, a)[0]
    mlp = [g.name for g in canonical.active_groups if g.name.endswith(".up")]
    fields = {name: getattr(canonical, name) for name in type(canonical).model_fields}
    bare = type(canonical)(**{  # the MLP units shown nowhere: no recorded site, no writer
        **fields, "groups": tuple(g.model_copy(update={"activations": ()}) if g.name in mlp else g for g in canonical.groups),
        "affine_sites": tuple(site for site in canonical.affine_sites if not site.weight.endswith("up.weight"))})
    result = generalized_activation_matching(bare, GraphRunner.for_spec(spec, model), a, b, token_data(torch.float64))
    assert set(result.fallback_groups) == set(mlp) and result.n_iter >= 1
    recovered = apply_transform(bare, result.transforms, b)
    assert _relative_error(recovered, a) < 1e-6
    exact = sum(float((a[k] * recovered[k]).sum()) for k in bare.members_by_param)
    assert math.isclose(result.objective, exact, rel_tol=1e-9)


def test_permutation_symmetries_are_activation_matching():
    model, spec, _ = _model(9, heads=2, norm="layer")
    a, b = _state(model), _state(_model(10, heads=2, norm="layer")[0])
    data = token_data(torch.float64)
    result = autoperm.align(spec, a, b, symmetries="permutation", method="act", runner=GraphRunner.for_spec(spec, model),
                            data=data)
    expected = autoperm.activation_matching(spec, model, a, b, data, batch_size=256)
    assert all(torch.equal(result.perms[name], perm) for name, perm in expected.perms.items())


def test_activation_method_needs_a_runner_and_data_and_a_known_name():
    model, spec, _ = _model(0, heads=2)
    a = _state(model)
    with pytest.raises(autoperm.SolverError, match="runner=autoperm.trace.GraphRunner"):
        autoperm.align(spec, a, a, symmetries="orthogonal", method="act", data=token_data(torch.float64))
    with pytest.raises(autoperm.SolverError, match="unknown method"):
        autoperm.align(spec, a, a, method="activations")


def test_cli_match_with_activations_writes_b_aligned_in_a_gauge(tmp_path: Path):
    torch.manual_seed(0)
    model = TinyTransformer(heads=2, norm="layer")  # gains 1, biases 0: A is its own canonical form
    inputs = token_data()[0][:4]
    spec = autoperm.infer_spec(model, (inputs,))
    canonical, a = autoperm.canonicalize(spec, _state(model))
    b = apply_transform(canonical, random_transform(canonical, seed=2, kinds=["permutation", "orthogonal"]), a)
    autoperm.save_state_dict(a, tmp_path / "a.pt")
    autoperm.save_state_dict(b, tmp_path / "b.pt")
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(cli, ["match", *MODEL, "--a", str(tmp_path / "a.pt"), "--b", str(tmp_path / "b.pt"),
                                      "--method", "act", "--symmetries", "orthogonal", "--data",
                                      "tests.solvers.test_generalized_activation:token_data", "-o", str(out)],
                                standalone_mode=False, catch_exceptions=True)
    assert result.exception is None, result.output
    assert "(activation matching)" in result.output
    aligned = autoperm.load_state_dict(out)
    assert torch.allclose(_output(model, aligned, inputs), _output(model, b, inputs), atol=1e-5)
    assert max(float((aligned[k] - a[k]).abs().max()) for k in a) < 1e-4
