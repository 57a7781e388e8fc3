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
        assert set(methods) == {f"{m}{r}" for m in lmc.METHODS for r in ("", "+repair")}
        assert methods["wm"]["barrier"]["test_loss"] < methods["naive"]["barrier"]["test_loss"], name
        assert set(part["anchor"]) == {"wm", "wm+repair", "ste", "ste+repair"}
        assert (tmp_path / f"{name}_barrier.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / f"{name}_R_layers.png").exists()
    # the curves start at A and end at B as evaluated on their own (the MLP has no BatchNorm to reset):
    # the state dicts the methods see are the trained models', not overwritten by later evaluations
    mlp = report["families"]["mlp"]
    for method in lmc.METHODS:  # the generalised rows pair B, in A's gauge, with A as it is
        assert mlp["curves"][method]["test_loss"][0] == pytest.approx(mlp["endpoints"]["A"]["test_loss"], rel=1e-6)
    assert mlp["curves"]["naive"]["test_loss"][-1] == pytest.approx(mlp["endpoints"]["B"]["test_loss"], rel=1e-6)
    assert mlp["anchor"]["wm"]["test_loss"] != mlp["methods"]["wm"]["barrier"]["test_loss"]
    assert set(report["families"]["mlp"]["width_trend"]) == {"16"}
    table = lmc.format_tables(report)
    assert "| mlp | wm |" in table and "| vgg | naive |" in table and "| vgg | gwm-full+learn |" in table


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


def test_authors_recipe_warms_up_then_decays_and_crops_by_a_pixel(lmc):
    vgg = lmc.authors_recipe(lmc.FAMILIES["vgg"])
    assert (vgg.optimizer, vgg.lr, vgg.weight_decay, vgg.batch_size, vgg.epochs, vgg.warmup_epochs, vgg.crop) == (
        "sgd", 0.4, 5e-4, 500, 100, 5, 1)
    mlp = lmc.authors_recipe(lmc.FAMILIES["mlp"])
    assert (mlp.optimizer, mlp.lr, mlp.batch_size, mlp.epochs, mlp.weight_decay) == ("adam", 1e-3, 500, 5, 0.0)
    assert lmc.authors_recipe(lmc.FAMILIES["vit"]) == lmc.FAMILIES["vit"]  # no recipe of the authors
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    schedule = lmc._schedule(optimizer, vgg, per_epoch=3)
    rates = []
    for _ in range(vgg.epochs * 3):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    peak = rates.index(max(rates))
    assert peak == 5 * 3 - 1 and max(rates) == pytest.approx(0.4)  # linear warm-up over 5 epochs
    assert all(a > b for a, b in zip(rates[peak + 1:], rates[peak + 2:])) and rates[-1] < 0.01  # then linear decay
    images = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    cropped = lmc._random_crops(images, 1, torch.Generator().manual_seed(0))
    assert cropped.shape == images.shape
    for image, shifted in zip(images, cropped):  # each image moved by at most one pixel, zeros filling in
        assert any(torch.equal(torch.nn.functional.pad(image, (1, 1, 1, 1))[:, y: y + 8, x: x + 8], shifted)
                   for y in range(3) for x in range(3))


def test_three_model_comparison_reports_every_triple_and_their_spread(lmc, tmp_path):
    report = lmc.run(["mlp", "vgg"], tmp_path, quick_run=True, points=3, recipe="authors", triples=2, ste_steps=3)
    for name in ("mlp", "vgg"):
        part = report["three_models"][name]
        assert part["recipe"] == "authors" and [row["seeds"] for row in part["triples"]] == [[0, 1, 2], [3, 4, 5]]
        values = [row["anchor_barrier wm"] for row in part["triples"]]
        assert part["anchor_barrier wm"]["mean"] == pytest.approx(sum(values) / 2)
        assert part["anchor_barrier wm"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
        assert all(math.isfinite(v) for v in _numbers(part))
    assert "| vgg | authors | 2 | 3 |" in lmc.format_tables(report)


def test_rows_limit_the_methods_and_learn_every_map(lmc, tmp_path):
    """`--rows`: only the methods asked for (and naive), no anchor scheme without STE; the row that
    learns every map runs the joint refinement (permutations straight-through)."""
    report = lmc.run(["mlp"], tmp_path, quick_run=True, points=3, rows=["wm", "gwm-full+learn-all"])
    part = report["families"]["mlp"]
    assert set(part["methods"]) == {f"{m}{r}" for m in ("naive", "wm", "gwm-full+learn-all") for r in ("", "+repair")}
    assert part["anchor"] == {}
    assert all(math.isfinite(v) for v in _numbers(part))
    assert "| mlp | gwm-full+learn-all |" in lmc.format_tables(report)
