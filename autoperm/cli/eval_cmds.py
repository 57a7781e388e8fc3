"""`autoperm barrier`, `autoperm analyze` and `autoperm demo`: measure linear mode connectivity."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from autoperm.errors import CheckpointError

__all__ = ["register", "barrier_command", "analyze_command", "demo_command"]


def _write_json(path: str, payload: Mapping[str, Any]) -> None:
    from autoperm.io import write_text_atomic

    write_text_atomic(Path(path), json.dumps(payload, indent=2))
    click.echo(f"wrote {path}")


def _load_checkpoints(model: nn.Module, paths: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Load each checkpoint and check that it fits ``model`` (names and shapes).

    A ``save_pretrained`` directory is read memory-mapped, under the model's names (stored
    names that transformers renames when loading are renamed the same way, tied tensors filled in).
    """
    from autoperm.io import load_state_dict
    from autoperm.pretrained import load_directory_weights, tied_names

    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    loaded = {}
    for option, path in paths.items():
        if Path(path).is_dir():
            state_dict, _ = load_directory_weights(path, model, tied=tied_names(model))
        else:
            state_dict = load_state_dict(path)
        missing = [k for k in expected if k not in state_dict]
        extra = [k for k in state_dict if k not in expected]
        wrong = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
        if missing or extra or wrong:
            raise CheckpointError(
                f"{option} {path!r} does not fit the model: missing {missing[:3]}, unexpected {extra[:3]}, "
                f"wrong shape {wrong[:3]}. Pass the same MODEL and --kwargs the checkpoint was trained with."
            )
        loaded[option] = state_dict
    return loaded


def _model_from(model_path: str, kwargs: Sequence[str], device: str = "cpu") -> nn.Module:
    """MODEL as ``package.module:attr`` (called with ``kwargs``) or a model directory built from its config.

    A directory's model is built on ``device`` in float32 with fresh weights (the checkpoints
    are loaded into it later).
    """
    from autoperm.cli.common import ModelArgs, load_model, parse_kwargs

    if not Path(model_path).is_dir():
        return load_model(model_path, parse_kwargs(kwargs))
    from autoperm.pretrained import build_from_directory

    directory = ModelArgs(model_path, kwargs, (), "float32").directory
    return build_from_directory(directory, device)


def _logits_first(module: nn.Module, inputs: Any, output: Any) -> Any:
    """Forward hook: a model output's logits (or diffusers' sample) with the class axis second."""
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = getattr(output, "sample", None)
    if logits is None and isinstance(output, tuple) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        return output
    return logits.transpose(1, 2) if logits.dim() == 3 else logits  # (batch, sequence, vocabulary) -> (batch, vocabulary, sequence)


@click.command("barrier")
@click.argument("model", metavar="MODEL")
@click.option("--kwargs", "kwargs", multiple=True, metavar="KEY=VALUE", help="Model constructor argument; repeatable.")
@click.option("--a", "path_a", required=True, metavar="PATH", help="Checkpoint of model A (t = 0): a file or directory.")
@click.option("--b", "path_b", required=True, metavar="PATH", help="Checkpoint of model B (t = 1), aligned to A or not.")
@click.option("--data", "data_source", required=True, metavar="DATA",
              help="'digits' or package.module:function returning a DataLoader, (inputs, targets) or {split: ...}.")
@click.option("--points", default=25, show_default=True, type=click.IntRange(min=2), help="Points along the path.")
@click.option("--reset-bn", is_flag=True, help="Recompute BatchNorm statistics of every point on the 'train' split (else the first).")
@click.option("--repair", is_flag=True,
              help="Also measure the path with REPAIR (arXiv 2211.08403): every point's permuted channels renormalised "
                   "to the interpolated statistics of A and B on the 'train' split (else the first).")
@click.option("--spec", "spec_path", metavar="YAML", help="Permutation spec for --repair (inferred from the data if left out).")
@click.option("--plot", "plot_path", metavar="PNG", help="Write the curve to this image.")
@click.option("--json", "json_path", metavar="FILE", help="Write the curve and barriers as JSON.")
@click.option("--symmetries", type=click.Choice(["permutation", "orthogonal", "full"]),
              help="First align B to A with these symmetry kinds (as `autoperm match --symmetries`); default: B as given.")
def barrier_command(
    model: str, kwargs: Sequence[str], path_a: str, path_b: str, data_source: str, points: int,
    reset_bn: bool, repair: bool, spec_path: str | None, plot_path: str | None, json_path: str | None,
    symmetries: str | None,
) -> None:
    """Loss and accuracy barriers on the straight line from checkpoint A to checkpoint B.

    Mean barrier: max_t L(t) - (L(0) + L(1)) / 2 (Git Re-Basin); linear barrier:
    max_t L(t) - ((1 - t) L(0) + t L(1)) (Entezari et al.). Accuracy barriers are the drop.
    With --repair, B should already be aligned to A (autoperm match).

    MODEL is package.module:attr or a model directory (save_pretrained; its config builds the
    model, and A and B may be directories). A language model's loss is the cross-entropy of its
    logits against targets of shape (batch, sequence), e.g. the inputs shifted by one token.
    """
    from autoperm.data import load_data
    from autoperm.evaluate import barrier_summary, interpolation_curve

    module = _model_from(model, kwargs)
    if Path(model).is_dir():  # a transformers or diffusers model: its logits as one tensor
        module.register_forward_hook(_logits_first)
    checkpoints = _load_checkpoints(module, {"--a": path_a, "--b": path_b})
    splits = load_data(data_source)
    train_data = splits["train"] if "train" in splits else next(iter(splits.values()))
    if symmetries:
        checkpoints["--b"] = _aligned(module, model, spec_path, checkpoints, train_data, symmetries)
    transforms: dict[str, Any] = {"plain": None}
    repairer = None
    if repair:
        repairer = _repairer(module, model, spec_path, checkpoints, train_data)
        transforms["REPAIR"] = repairer
    curves = {}
    for label, transform in transforms.items():
        with click.progressbar(length=points, label=f"interpolating ({label})", file=sys.stderr) as bar:
            curves[label] = interpolation_curve(
                module, checkpoints["--a"], checkpoints["--b"], splits, num_points=points,
                reset_bn=train_data if reset_bn else None, transform=transform,
                progress=lambda done, total: bar.update(1),
            )
    summaries = {label: barrier_summary(curve) for label, curve in curves.items()}
    for label, summary in summaries.items():
        curve = curves[label]
        title = "with REPAIR" if label == "REPAIR" else "interpolated weights" if repair else ""
        click.echo(f"\n{title}" if title else "")
        click.echo(f"{'metric':<20}{'A (t=0)':>10}{'B (t=1)':>10}{'worst':>10}{'mean barrier':>14}{'linear barrier':>16}")
        for name, barriers in summary.items():
            values = curve[name]
            worst = max(values) if name.endswith("loss") else min(values)
            click.echo(
                f"{name:<20}{values[0]:>10.4f}{values[-1]:>10.4f}{worst:>10.4f}{barriers['mean']:>14.4f}{barriers['linear']:>16.4f}"
            )
    if plot_path:
        from autoperm.evaluate.plots import plot_interpolation

        labelled = {Path(path_b).stem if label == "plain" else f"{Path(path_b).stem} + REPAIR": c for label, c in curves.items()}
        click.echo(f"wrote {plot_interpolation(labelled, plot_path, f'{path_a} -> {path_b}')}")
    if json_path:
        payload: dict[str, Any] = {"a": path_a, "b": path_b, "data": data_source, "reset_bn": reset_bn,
                                   "barriers": summaries["plain"], "curve": curves["plain"].to_dict()}
        if repairer is not None:
            payload["repair"] = {"barriers": summaries["REPAIR"], "curve": curves["REPAIR"].to_dict(),
                                 "sites": [site.to_dict() for site in repairer.sites]}
        _write_json(json_path, payload)


def _spec_on_data(module: nn.Module, model_path: str, spec_path: str | None, train_data: Any, option: str):
    """The spec from ``--spec``, or one inferred on one training input."""
    from autoperm.cli.common import load_spec_or_infer
    from autoperm.data import DataError, iter_batches

    inputs = next((batch for batch, _ in iter_batches(train_data)), None)
    if inputs is None:
        raise DataError(f"{option}: the training data yielded no batches")
    return load_spec_or_infer(spec_path, module, (inputs[:1],), model_path)


def _aligned(module: nn.Module, model_path: str, spec_path: str | None, checkpoints: Mapping[str, Any], train_data: Any,
             symmetries: str) -> dict[str, torch.Tensor]:
    """B aligned to A for ``barrier --symmetries`` (weight matching, generalised for orthogonal / full)."""
    from autoperm.solvers import align

    spec = _spec_on_data(module, model_path, spec_path, train_data, "--symmetries")
    result = align(spec, checkpoints["--a"], checkpoints["--b"], symmetries=symmetries)
    click.echo(f"aligned B to A with {symmetries} symmetries in {result.seconds:.1f} s")
    return {name: result.state_dict[name].to(tensor.dtype) for name, tensor in checkpoints["--b"].items()}


def _repairer(module: nn.Module, model_path: str, spec_path: str | None, checkpoints: Mapping[str, Any], train_data: Any):
    """A :class:`autoperm.Repairer` for ``barrier --repair``; the spec is inferred on one training input if not given."""
    from autoperm.api import Repairer

    spec = _spec_on_data(module, model_path, spec_path, train_data, "--repair")
    repairer = Repairer(spec, module, checkpoints["--a"], checkpoints["--b"], train_data)
    click.echo(f"REPAIR: {len(repairer.sites)} layer(s), {sum(len(s.channels) for s in repairer.sites)} channels corrected")
    if not repairer.sites:
        click.echo("REPAIR: no permuted channel has a layer with a per-channel affine; the repaired curve equals the plain one")
    return repairer


@click.command("analyze")
@click.argument("model")
@click.option("--kwargs", "kwargs", multiple=True, metavar="KEY=VALUE", help="Model constructor argument; repeatable.")
@click.option("--a", "path_a", required=True, metavar="PATH", help="Checkpoint (file or directory) of the reference model A.")
@click.option("--b", "path_b", required=True, metavar="PATH", help="Checkpoint of model B as trained.")
@click.option("--b-aligned", "path_aligned", metavar="PATH", help="Checkpoint of B after alignment to A.")
@click.option("--gamma", default=0.3, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
              help="Count singular vectors with s >= gamma * s_max.")
@click.option("--spec", "spec_path", metavar="YAML", help="Permutation spec, for the singular-value invariance check.")
@click.option("--input-shape", "input_shape", multiple=True, metavar="SHAPE",
              help="Example input shape (e.g. 1,64) to infer the spec instead of --spec.")
@click.option("--dtype", default="float32", show_default=True, help="dtype of the example inputs.")
@click.option("--json", "json_path", metavar="FILE", help="Write the figures (with spectra) as JSON.")
def analyze_command(
    model: str, kwargs: Sequence[str], path_a: str, path_b: str, path_aligned: str | None, gamma: float,
    spec_path: str | None, input_shape: Sequence[str], dtype: str, json_path: str | None,
) -> None:
    """L2 distance and singular-vector alignment R of B (and aligned B) to A (Ito et al., arXiv 2402.04051).

    MODEL is package.module:attr or a model directory (built on the meta device from its config;
    A, B and aligned B may be directories).
    """
    from autoperm.cli.common import ModelArgs, load_spec_or_infer, make_inputs, parse_shape
    from autoperm.evaluate import l2_distance, singular_analysis

    module = _model_from(model, kwargs, device="meta")
    paths = {"--a": path_a, "--b": path_b, **({"--b-aligned": path_aligned} if path_aligned else {})}
    checkpoints = _load_checkpoints(module, paths)
    spec = None
    if Path(model).is_dir() and (spec_path or input_shape):
        args = ModelArgs(model, kwargs, input_shape, dtype)
        spec = load_spec_or_infer(spec_path, *args.build(), args.name, args)
    elif spec_path or input_shape:
        inputs = make_inputs(module, [parse_shape(s) for s in input_shape], dtype) if input_shape else ()
        spec = load_spec_or_infer(spec_path, module, inputs, model)
    compared = {"B": checkpoints["--b"], **({"B aligned": checkpoints["--b-aligned"]} if path_aligned else {})}
    report: dict[str, Any] = {"a": path_a, "b": path_b, "b_aligned": path_aligned, "gamma": gamma}
    analyses = {}
    click.echo(f"{'vs A':<12}{'L2 distance':>12}{'relative':>10}{'R':>8}")
    for label, state_dict in compared.items():
        distance = l2_distance(checkpoints["--a"], state_dict)
        analysis = singular_analysis(spec, checkpoints["--a"], state_dict, gamma=gamma)
        analyses[label] = analysis
        report[label.replace(" ", "_")] = {"l2_distance": distance.to_dict(), "singular": analysis.to_dict()}
        click.echo(f"{label:<12}{distance.absolute:>12.4f}{distance.relative:>10.4f}{analysis.alignment:>8.3f}")
    if path_aligned:
        before = report["B"]["l2_distance"]["absolute"]
        after = report["B_aligned"]["l2_distance"]["absolute"]
        report["l2_reduction"] = 1.0 - after / before if before else 0.0
        click.echo(f"L2 distance reduced by {100 * report['l2_reduction']:.1f}% by the alignment")
    click.echo(f"\nper layer R (gamma = {gamma}; n = singular vectors counted)")
    click.echo(f"{'layer':<32}{'shape':>14}" + "".join(f"{label:>14}" for label in analyses))
    first = next(iter(analyses.values()))
    for index, layer in enumerate(first.layers):
        cells = "".join(
            f"{analysis.layers[index].alignment:>8.3f} n={analysis.layers[index].num_vectors:<3}" for analysis in analyses.values()
        )
        click.echo(f"{layer.name:<32}{'x'.join(map(str, layer.shape)):>14}{cells}")
    if spec is None:
        click.echo("singular-value invariance check skipped (give --spec or --input-shape to run it)")
    else:
        error = max(analysis.invariance_error or 0.0 for analysis in analyses.values())
        report["singular_value_invariance_error"] = error
        click.echo(f"largest singular-value change under a random permutation of the spec: {error:.1e}")
    if json_path:
        _write_json(json_path, report)


@click.command("demo")
@click.option("--out", "out_dir", default="autoperm-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for report.json and the plots.")
@click.option("--setting", type=click.Choice(["fast", "paper", "r-study"]), default="fast", show_default=True,
              help="fast: 3 x 256 MLPs on --data (about 2 minutes on digits); paper: Ito et al.'s MLP setting "
                   "on MNIST digits with the authors' recipe, 3 runs; r-study: R against the training budget "
                   "and training-set size on MNIST digits. paper and r-study need the data extra.")
@click.option("--data", "data_name", type=click.Choice(["digits", "mnist"]),
              help="Data of the fast setting (default digits; mnist needs pip install 'autoperm[data]').")
@click.option("--quick", is_flag=True, help="Narrow models, few epochs, points and STE steps (seconds, a smoke test).")
@click.option("--hidden", type=click.IntRange(min=2), help="Hidden width (fast: 256, paper: 512).")
@click.option("--ste-steps", type=click.IntRange(min=1), help="STE steps (default 2300, STE-MM's budget).")
@click.option("--ste-optimizer", type=click.Choice(["adam", "sgd"]),
              help="adam (STE-MM, default, lr 1e-3) or sgd (Git Re-Basin, momentum 0.9, lr 1e-2).")
@click.option("--runs", type=click.IntRange(min=2), default=3, show_default=True,
              help="paper: independent runs (triples of models) behind each mean and std.")
@click.option("--pixels", type=click.Choice(["normalised", "raw"]),
              help="paper and r-study: MNIST pixels normalised with MNIST's mean and std (default) or raw in "
                   "[0, 1] (Ito et al.'s follow-up code).")
@click.option("--precision", type=click.Choice(["float32", "bf16-mixed"]), default="float32", show_default=True,
              help="Training precision; bf16-mixed runs forward and loss under bfloat16 autocast with float32 "
                   "weights (Ito et al.'s follow-up code). Evaluation is in float32.")
def demo_command(
    out_dir: str, setting: str, data_name: str | None, quick: bool, hidden: int | None, ste_steps: int | None,
    ste_optimizer: str | None, runs: int, pixels: str | None, precision: str,
) -> None:
    """Train MLPs and run the analysis of Ito et al. (arXiv 2402.04051); say which setting ran.

    Naive, weight matching (5 seeds), activation matching and STE: barriers, L2 distance, the
    alignment R at gamma 0 and 0.3 (pooled and per layer); the anchor scheme with three models
    and MergeMany; and which of the paper's three findings reproduced. Writes report.json and
    PNG plots into --out.
    """
    import dataclasses

    from autoperm.demo import DemoConfig, format_report, run_demo

    if data_name is not None and setting != "fast":
        raise click.UsageError(f"--data chooses the fast setting's data; --setting {setting} uses MNIST digits")
    if pixels is not None and setting == "fast":
        raise click.UsageError("--pixels chooses how the MNIST pixels of --setting paper and r-study are scaled; "
                               "the fast setting keeps its data's standardisation")
    normalise = pixels != "raw"
    if setting == "r-study":
        from autoperm.demo_study import StudyConfig, format_study, run_alignment_study

        study = StudyConfig.quick if quick else StudyConfig
        click.echo("setting r-study: R against the training budget and training-set size on MNIST digits")
        click.echo(format_study(run_alignment_study(
            out_dir, quick=quick, config=study(normalise=normalise, precision=precision), progress=click.echo
        )))
        return
    if setting == "paper":
        from autoperm.demo_paper import (
            format_paper_report,
            paper_config,
            run_paper_setting,
        )

        config = paper_config(quick)
    else:
        config = DemoConfig.quick() if quick else DemoConfig()
    changes: dict[str, Any] = {"hidden": hidden, "ste_steps": ste_steps, "precision": precision}
    if ste_optimizer is not None:
        changes.update(ste_optimizer=ste_optimizer, ste_lr=1e-3 if ste_optimizer == "adam" else 1e-2)
    config = dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
    if setting == "paper":
        click.echo(
            f"setting paper: {config.depth} x {config.hidden} MLPs on MNIST digits, Adam {config.lr:g}, "
            f"{config.epochs} epochs, batch {config.batch_size}, {precision} training, {pixels or 'normalised'} "
            f"pixels; {runs} runs"
        )
        summary = run_paper_setting(
            out_dir, quick=quick, runs=runs, progress=click.echo, config=config, normalise=normalise
        )
        click.echo(format_paper_report(summary))
        return
    data_name = data_name or "digits"
    click.echo(
        f"setting fast: {config.depth} x {config.hidden} MLPs on {data_name}, {config.epochs} epochs "
        f"(--setting paper runs Ito et al.'s MLP setting on MNIST digits)"
    )
    report = run_demo(out_dir, config=config, progress=click.echo, data=data_name)
    click.echo(format_report(report))


def register(cli: click.Group) -> None:
    """Add the evaluation commands to the ``autoperm`` group."""
    cli.add_command(barrier_command)
    cli.add_command(analyze_command)
    cli.add_command(demo_command)
