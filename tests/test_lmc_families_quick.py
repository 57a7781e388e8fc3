"""The `--quick` variant of `benchmarks/lmc_families.py` on two families (MLP, VGG with BatchNorm).

Only what must hold is asserted, never tuned thresholds: every reported number is finite, weight
matching lowers the test-loss barrier of the trained pair below the naive one, the report and the
plots are written, and REPAIR's corrected model is a plain state dict of the same architecture.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import autoperm

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "lmc_families.py"


@pytest.fixture(scope="module")
def lmc():
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("lmc_families", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lmc_families"] = module
    spec.loader.exec_module(module)
    return module


def _numbers(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, float):
        yield value


@pytest.mark.slow
def test_quick_run_reports_finite_barriers_and_wm_below_naive(lmc, tmp_path):
    report = lmc.run(["mlp", "vgg"], tmp_path, quick_run=True, points=3, widths=(16,))
    assert json.loads((tmp_path / "report.json").read_text())["families"].keys() == {"mlp", "vgg"}
    for name, part in report["families"].items():
        assert all(math.isfinite(v) for v in _numbers(part)), name
        methods = part["methods"]
        assert set(methods) == {f"{m}{r}" for m in ("naive", "wm", "am", "ste") for r in ("", "+repair")}
        assert methods["wm"]["barrier"]["test_loss"] < methods["naive"]["barrier"]["test_loss"], name
        assert set(part["anchor"]) == {"wm", "wm+repair", "ste", "ste+repair"}
        assert (tmp_path / f"{name}_barrier.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / f"{name}_R_layers.png").exists()
    # the curves start at A and end at B as evaluated on their own (the MLP has no BatchNorm to reset):
    # the state dicts the methods see are the trained models', not overwritten by later evaluations
    mlp = report["families"]["mlp"]
    for method in ("naive", "wm", "am", "ste"):
        assert mlp["curves"][method]["test_loss"][0] == pytest.approx(mlp["endpoints"]["A"]["test_loss"], rel=1e-6)
    assert mlp["curves"]["naive"]["test_loss"][-1] == pytest.approx(mlp["endpoints"]["B"]["test_loss"], rel=1e-6)
    assert mlp["anchor"]["wm"]["test_loss"] != mlp["methods"]["wm"]["barrier"]["test_loss"]
    assert set(report["families"]["mlp"]["width_trend"]) == {"16"}
    table = lmc.format_tables(report)
    assert "| mlp | wm |" in table and "| vgg | naive |" in table


def test_repair_keeps_the_architecture_of_a_trained_pair(lmc):
    family = lmc.quick(lmc.FAMILIES["vgg"])
    splits = lmc.digits(flat=False)
    with lmc.tqdm(disable=True) as bar:
        models = [lmc.train(family, family.build(family.width, seed), splits, seed, bar) for seed in (0, 1)]
    sd_a, sd_b = (m.state_dict() for m in models)
    spec = autoperm.infer_spec(models[0], splits["train"][0][:1])
    sd_b = autoperm.apply_permutation(spec, autoperm.weight_matching(spec, sd_a, sd_b).perms, sd_b)
    result = autoperm.repair(spec, models[0], sd_a, sd_b, splits["train"], t=0.5)
    assert {k: v.shape for k, v in result.state_dict.items()} == {k: v.shape for k, v in sd_a.items()}
    fresh = family.build(family.width, 5)
    fresh.load_state_dict(result.state_dict, strict=True)
    with torch.no_grad():
        assert torch.isfinite(fresh.eval()(splits["test"][0])).all()
    assert {site.op for site in result.sites} == {"BatchNorm2d"}
