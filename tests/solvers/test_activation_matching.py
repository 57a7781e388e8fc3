"""Activation matching: planted recovery, weight-matching fallback, the correlation itself."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from autoperm import PermutationSpec, SolverError, apply_permutation, random_permutation
from autoperm import activation_matching
from autoperm.solvers.activation_matching import correlation_matrix
from tests._specs import MLP, mlp_spec, record_lap_methods


def _spec_with_sites(model: MLP, observed: dict[str, list[str]]) -> PermutationSpec:
    data = mlp_spec(model).model_dump()
    for group in data["groups"]:
        group["activations"] = [{"node": node, "axis": 1} for node in observed.get(group["name"], [])]
    return PermutationSpec.model_validate(data)


def _planted():
    torch.manual_seed(0)
    model = MLP(in_features=16, hidden=8, depth=3, num_classes=4)
    sd_a = model.state_dict()
    return model, sd_a


def test_recovers_planted_permutation_from_activations() -> None:
    model, sd_a = _planted()
    spec = _spec_with_sites(model, {"hidden0": ["layers_0"], "hidden1": ["layers_1", "relu_1"], "hidden2": ["layers_2"]})
    sd_b = apply_permutation(spec, random_permutation(spec, seed=4), sd_a)
    data = (torch.randn(256, 16), torch.zeros(256, dtype=torch.long))

    result = activation_matching(spec, model, sd_a, sd_b, data, batch_size=64)

    aligned = apply_permutation(spec, result.perms, sd_b)
    assert all(torch.equal(aligned[k], sd_a[k]) for k in sd_a)
    assert result.fallback_groups == ()


def test_groups_without_activations_fall_back_to_weight_matching() -> None:
    model, sd_a = _planted()
    spec = _spec_with_sites(model, {"hidden0": ["layers_0"]})
    sd_b = apply_permutation(spec, random_permutation(spec, seed=5), sd_a)
    data = [(torch.randn(64, 16), torch.zeros(64))]

    result = activation_matching(spec, model, sd_a, sd_b, data)

    assert result.fallback_groups == ("hidden1", "hidden2")
    aligned = apply_permutation(spec, result.perms, sd_b)
    assert all(torch.equal(aligned[k], sd_a[k]) for k in sd_a)


def test_empty_data_is_refused() -> None:
    model, sd_a = _planted()
    spec = _spec_with_sites(model, {"hidden0": ["relu"]})
    with pytest.raises(SolverError, match="no batches"):
        activation_matching(spec, model, sd_a, sd_a, [])


def test_correlation_matches_numpy_over_chunks() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 40, generator=generator), torch.randn(5, 40, generator=generator)
    b[2] = a[3] * 2 + 1
    chunks = correlation_matrix([a[:, :15], a[:, 15:]], [b[:, :15], b[:, 15:]])
    expected = np.corrcoef(a.numpy(), b.numpy())[:5, 5:]
    np.testing.assert_allclose(chunks, expected, atol=1e-6)
    assert chunks[3, 2] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("lap", ["scipy", "lapx", "auction"])
def test_lap_backend_reaches_every_group(monkeypatch, lap: str) -> None:
    if lap == "lapx":
        pytest.importorskip("lap")
    model, sd_a = _planted()
    spec = _spec_with_sites(model, {"hidden0": ["layers_0"], "hidden1": ["layers_1"]})
    sd_b = apply_permutation(spec, random_permutation(spec, seed=6), sd_a)
    methods = record_lap_methods(monkeypatch, sys.modules["autoperm.solvers.activation_matching"])
    result = activation_matching(spec, model, sd_a, sd_b, (torch.randn(128, 16), torch.zeros(128)), lap=lap)
    assert methods == [lap, lap]  # one LAP per observed group; hidden2 falls back to weight matching
    aligned = apply_permutation(spec, result.perms, sd_b)
    assert all(torch.equal(aligned[k], sd_a[k]) for k in sd_a)
