"""The specs bundled in specs/ are what inference produces today, and they verify."""

from __future__ import annotations

from pathlib import Path

import pytest

from autoperm import PermutationSpec
from autoperm.reference import REFERENCE_MODELS, available, build_reference_spec

SPECS = Path(__file__).resolve().parents[2] / "specs"


def _structure(spec: PermutationSpec) -> list[tuple]:
    """Groups without activation sites (node names depend on the torch version)."""
    return [(g.name, g.size, g.per, g.fixed, g.kind, g.members) for g in spec.groups]


@pytest.mark.parametrize("reference", REFERENCE_MODELS, ids=lambda r: r.file)
def test_bundled_spec_is_current(reference):
    path = SPECS / reference.file
    assert path.exists(), f"{path} is missing: run python -m autoperm.reference"
    if not available(reference):
        pytest.skip(f"{reference.requires} is not installed")
    if reference.file.startswith("torchvision_vit"):
        pytest.skip("ViT-B/16 at 224x224 is too slow for the test budget")
    bundled = PermutationSpec.from_yaml(path)
    fresh = build_reference_spec(reference)
    assert _structure(fresh) == _structure(bundled), f"{path} is stale: run python -m autoperm.reference"
    assert fresh.shapes == bundled.shapes


def test_reference_group_counts():
    counts = {r.file: len(PermutationSpec.from_yaml(SPECS / r.file).active_groups) for r in REFERENCE_MODELS}
    assert counts["mlp.yaml"] == 3
    assert counts["resnet20.yaml"] == 12 and counts["resnet20_x4.yaml"] == 12
    assert counts["vgg11.yaml"] == 10
    assert counts["torchvision_resnet18.yaml"] == 12
