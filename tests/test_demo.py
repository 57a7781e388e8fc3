"""`run_demo` in its quick mode: every section present, every number finite, files written."""

from __future__ import annotations

import json
import math

import pytest

from autoperm.demo import DemoConfig, format_report, run_demo

METHODS = {"naive", "weight_matching", "activation_matching", "ste"}
ANCHOR_METHODS = {"naive", "weight_matching", "ste"}
GAMMAS = {"gamma=0", "gamma=0.3"}


def walk_numbers(value, path="report"):
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from walk_numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from walk_numbers(item, f"{path}[{index}]")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    messages: list[str] = []
    report = run_demo(out, quick=True, progress=messages.append)
    return out, report, messages


def test_quick_report_has_every_section_with_finite_numbers(quick_report):
    out, report, messages = quick_report
    assert set(report) >= {
        "config", "models", "pair", "weight_matching_seeds", "ste", "anchor", "merge", "findings", "files", "seconds",
    }
    pair = report["pair"]
    assert set(pair["barriers"]) == METHODS
    for barriers in pair["barriers"].values():
        assert set(barriers) == {"train_loss", "train_accuracy", "test_loss", "test_accuracy"}
        assert all(set(kinds) == {"mean", "linear"} for kinds in barriers.values())
    assert set(pair["l2_distance"]) == METHODS and set(pair["l2_reduction"]) == METHODS - {"naive"}
    for key in ("alignment", "alignment_mean_over_layers", "alignment_per_layer"):
        assert set(pair[key]) == METHODS and all(set(v) == GAMMAS for v in pair[key].values())
    seeds = report["weight_matching_seeds"]
    assert len(seeds["runs"]) == DemoConfig.quick().wm_seeds
    assert {"test_loss_barrier", "l2_reduction", "R gamma=0", "R gamma=0.3"} <= set(seeds)
    assert all(set(seeds[k]) == {"mean", "std"} for k in seeds if k != "runs")
    assert report["ste"]["steps"] == DemoConfig.quick().ste_steps and report["ste"]["steps_per_second"] > 0
    assert set(report["anchor"]["barriers_b_to_c"]) == ANCHOR_METHODS
    assert all(set(v) == GAMMAS for v in report["anchor"]["alignment_b_to_c"].values())
    assert set(report["merge"]["individual"]) == {"A", "B", "C"}
    assert {"merged", "naive_average", "alignment_to_models"} <= set(report["merge"])
    numbers = list(walk_numbers(report))
    assert len(numbers) > 100
    bad = [path for path, value in numbers if not math.isfinite(value)]
    assert not bad, f"non-finite numbers at {bad[:5]}"
    assert any("training model A" in m for m in messages)  # progress was reported
    assert any("STE" in m and "steps/s" in m for m in messages)


def test_quick_report_states_each_finding_with_numbers(quick_report):
    _, report, _ = quick_report
    found = report["findings"]
    assert [f["number"] for f in found] == [1, 2, 3]
    for finding in found:
        assert finding["status"] in {"reproduced", "partly reproduced", "not reproduced"}
        assert finding["criterion"] and any(ch.isdigit() for ch in finding["evidence"])
    text = format_report(report)
    assert all(finding["evidence"] in text for finding in found)
    assert "findings of Ito et al." in text


def test_quick_report_shows_the_findings_direction(quick_report):
    _, report, _ = quick_report
    pair = report["pair"]
    assert pair["barriers"]["naive"]["test_loss"]["mean"] > pair["barriers"]["weight_matching"]["test_loss"]["mean"]
    assert 0 < pair["l2_reduction"]["weight_matching"] < 0.5  # modest distance reduction
    assert pair["alignment"]["weight_matching"]["gamma=0.3"] > pair["alignment"]["naive"]["gamma=0.3"] + 0.1
    assert pair["singular_value_invariance_error"] < 1e-6


def test_quick_report_files_and_json_match(quick_report):
    out, report, _ = quick_report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["pair"]["barriers"] == report["pair"]["barriers"]
    for key in ("curves", "anchor_curves", "spectra", "alignment"):
        path = out / f"{report['files'][key].rsplit('/', 1)[-1]}"
        assert path.read_bytes()[:4] == b"\x89PNG"
    text = format_report(report)
    assert "weight_matching" in text and "activation_matching" in text and "MergeMany" in text
    assert "report.json" in text


def test_quick_config_is_smaller_than_the_full_one():
    quick, full = DemoConfig.quick(), DemoConfig()
    assert quick.epochs < full.epochs and quick.num_points < full.num_points and quick.ste_steps < full.ste_steps
    assert full.depth == 3 and full.lr == 1e-3  # the literature's MLP
    assert full.ste_steps >= 2000 and full.ste_lr == 1e-3 and full.ste_optimizer == "adam"  # STE-MM's budget
    assert full.wm_seeds == 5 and full.gammas == (0.0, 0.3)
