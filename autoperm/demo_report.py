"""The findings statement and the printed summary of a :func:`autoperm.demo.run_experiment` report.

Ito et al. (arXiv 2402.04051) make three claims; :func:`findings` checks each against the
numbers of one report with criteria fixed in advance (listed in :data:`CRITERIA`) and says in
words whether it reproduced, with the numbers. The criteria are thresholds chosen to read the
paper's qualitative claims, not fitted to any run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["CRITERIA", "findings", "format_report"]

CRITERIA = {
    1: "WM's L2 reduction (mean over seeds) is below 30% while its test loss barrier (mean over seeds) "
       "is at least 75% below the naive one",
    2: "permutations leave singular values unchanged (relative change < 1e-6), R after WM exceeds the naive R "
       "by at least 0.1 at gamma=0.3, and R after WM is higher at gamma=0.3 than at gamma=0 (the dominant "
       "directions are the aligned ones)",
    3: "STE's R(A, pi(B)) at gamma=0.3 is at least 0.05 below WM's, and in the anchor scheme the B-C test "
       "loss barrier with WM is at least 10% lower than with STE (both hold: reproduced; one: partly)",
}
"""The criterion each finding is judged by."""


def _r(values: Mapping[str, float], gamma: str) -> float:
    return float(values[gamma])


def findings(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Judge Ito et al.'s three findings on a report.

    Args:
        report: a :func:`autoperm.demo.run_experiment` report (without ``findings``).

    Returns:
        One entry per finding: ``number``, ``claim``, ``criterion``, ``status``
        (``"reproduced"``, ``"partly reproduced"`` or ``"not reproduced"``) and ``evidence``,
        a sentence with the numbers.
    """
    pair, seeds, anchor, ste = report["pair"], report["weight_matching_seeds"], report["anchor"], report["ste"]
    gammas = [f"gamma={g:g}" for g in report["config"]["gammas"]]
    low, high = gammas[0], gammas[-1]
    naive_barrier = pair["barriers"]["naive"]["test_loss"]["mean"]
    wm_barrier = seeds["test_loss_barrier"]["mean"]
    reduction = seeds["l2_reduction"]["mean"]
    barrier_drop = 1.0 - wm_barrier / naive_barrier if naive_barrier > 0 else 0.0
    ok1 = reduction < 0.30 and barrier_drop >= 0.75
    evidence1 = (
        f"WM (mean of {len(seeds['runs'])} seeds) reduces the L2 distance by {100 * reduction:.1f}% "
        f"(paper: 6-20%) while the test loss barrier falls from {naive_barrier:.4f} to {wm_barrier:.4f} "
        f"({100 * barrier_drop:.0f}% lower)."
    )

    r_naive, r_wm = pair["alignment"]["naive"], pair["alignment"]["weight_matching"]
    r_am, r_ste = pair["alignment"]["activation_matching"], pair["alignment"]["ste"]
    invariance = pair["singular_value_invariance_error"]
    ok2 = invariance < 1e-6 and _r(r_wm, high) >= _r(r_naive, high) + 0.1 and _r(r_wm, high) > _r(r_wm, low)
    evidence2 = (
        f"Singular values change by at most {invariance:.1e} under a permutation. R(A, pi(B)) at {high}: "
        f"naive {_r(r_naive, high):.3f}, WM {_r(r_wm, high):.3f} (over seeds {seeds['R ' + high]['mean']:.3f} "
        f"+- {seeds['R ' + high]['std']:.3f}), AM {_r(r_am, high):.3f}; at {low}: naive {_r(r_naive, low):.3f}, "
        f"WM {_r(r_wm, low):.3f}, AM {_r(r_am, low):.3f} (paper, MLP: about 0.8 at gamma=0.3 after WM; AM like WM)."
    )

    anchor_barriers = anchor["barriers_b_to_c"]
    anchor_wm = anchor_barriers["weight_matching"]["test_loss"]["mean"]
    anchor_ste = anchor_barriers["ste"]["test_loss"]["mean"]
    first, second = _r(r_ste, high) <= _r(r_wm, high) - 0.05, anchor_wm <= 0.9 * anchor_ste
    status3 = "reproduced" if first and second else "partly reproduced" if first or second else "not reproduced"
    evidence3 = (
        f"R(A, pi(B)) at {high}: STE {_r(r_ste, high):.3f} vs WM {_r(r_wm, high):.3f} "
        f"(at {low}: {_r(r_ste, low):.3f} vs {_r(r_wm, low):.3f}; paper: STE near 0). Anchor scheme, "
        f"B-C test loss barrier: WM {anchor_wm:.4f}, STE {anchor_ste:.4f} (linear: "
        f"{anchor_barriers['weight_matching']['test_loss']['linear']:.4f}, "
        f"{anchor_barriers['ste']['test_loss']['linear']:.4f}; train loss: "
        f"{anchor_barriers['weight_matching']['train_loss']['mean']:.4f}, "
        f"{anchor_barriers['ste']['train_loss']['mean']:.4f}; test accuracy drop: "
        f"{100 * anchor_barriers['weight_matching']['test_accuracy']['mean']:.2f}%, "
        f"{100 * anchor_barriers['ste']['test_accuracy']['mean']:.2f}%); R(B, C) at {high}: "
        f"WM {_r(anchor['alignment_b_to_c']['weight_matching'], high):.3f}, "
        f"STE {_r(anchor['alignment_b_to_c']['ste'], high):.3f}. STE ran {ste['steps']} steps and moved "
        f"{100 * ste['units_moved_from_weight_matching']:.1f}% of B's units away from WM's assignment; its "
        f"midpoint loss went {ste['midpoint_loss_start']:.4f} -> {ste['midpoint_loss_end']:.4f}."
    )
    return [
        {"number": 1, "claim": "WM reduces the L2 distance only modestly, yet the barrier collapses",
         "criterion": CRITERIA[1], "status": "reproduced" if ok1 else "not reproduced", "evidence": evidence1},
        {"number": 2, "claim": "permutations keep singular values; WM aligns the singular vectors of large "
                               "singular values", "criterion": CRITERIA[2],
         "status": "reproduced" if ok2 else "not reproduced", "evidence": evidence2},
        {"number": 3, "claim": "STE's permutations align singular vectors less, and WM beats STE in the "
                               "anchor scheme with three models", "criterion": CRITERIA[3],
         "status": status3, "evidence": evidence3},
    ]


def format_report(report: Mapping[str, Any]) -> str:
    """The printed summary of a report: tables for each section, then the findings in words."""
    pair, anchor, merge, seeds = report["pair"], report["anchor"], report["merge"], report["weight_matching_seeds"]
    gammas = [f"gamma={g:g}" for g in report["config"]["gammas"]]
    lines = [""]
    if report.get("setting"):
        lines.append(f"Setting: {report['setting']}")
    lines.append("1. A vs B: barriers (mean = max_t L(t) - (L_A + L_B)/2, linear = max_t L(t) - ((1-t)L_A + tL_B)),")
    lines.append("   L2 distance and R (pooled over layers, Ito et al.)")
    lines.append(
        f"   {'method':<20}{'test loss':>17}{'train loss':>17}{'acc drop %':>12}{'L2':>9}{'reduct.':>8}"
        + "".join(f"{'R ' + g:>13}" for g in gammas)
    )
    lines.append(f"   {'':<20}{'mean  linear':>17}{'mean  linear':>17}{'test train':>12}")
    for method, barriers in pair["barriers"].items():
        reduction = pair["l2_reduction"].get(method, 0.0)
        lines.append(
            f"   {method:<20}{barriers['test_loss']['mean']:>9.4f}{barriers['test_loss']['linear']:>8.4f}"
            f"{barriers['train_loss']['mean']:>9.4f}{barriers['train_loss']['linear']:>8.4f}"
            f"{100 * barriers['test_accuracy']['mean']:>6.2f}{100 * barriers['train_accuracy']['mean']:>6.2f}"
            f"{pair['l2_distance'][method]['absolute']:>9.2f}{100 * reduction:>7.1f}%"
            + "".join(f"{pair['alignment'][method][g]:>13.3f}" for g in gammas)
        )
    lines.append(f"   weight matching over {len(seeds['runs'])} seeds (mean +- std):")
    for key in ("test_loss_barrier", "train_loss_barrier", "l2_reduction", *[f"R {g}" for g in gammas]):
        lines.append(f"     {key:<22}{seeds[key]['mean']:>9.4f} +- {seeds[key]['std']:.4f}")
    for gamma, layers in seeds.get("alignment_per_layer", {}).items():
        cells = ", ".join(
            f"{layer} {values['naive']:.3f} -> {values['mean']:.3f} +- {values['std']:.3f}" for layer, values in layers.items()
        )
        lines.append(f"     R per layer at {gamma}, without permutation -> after WM: {cells}")
    lines.append(
        f"   largest singular-value change under a random permutation: {pair['singular_value_invariance_error']:.1e}"
    )
    ste = report["ste"]
    lines.append(
        f"   STE: {ste['steps']} {ste['optimizer']} steps (lr {ste['lr']:g}, batch {ste['batch_size']}) in "
        f"{ste['seconds']:.1f} s ({ste['steps_per_second']:.0f} steps/s), {ste['selected']} projection; "
        f"midpoint loss {ste['midpoint_loss_start']:.4f} -> {ste['midpoint_loss_end']:.4f}; "
        f"{100 * ste['units_moved_from_weight_matching']:.1f}% of units differ from WM"
    )
    lines.append("")
    lines.append("2. Three models: B and C each aligned to anchor A; barrier and R between the aligned B and C")
    lines.append(f"   {'method':<20}{'test loss':>17}{'train loss':>17}{'test acc %':>11}" + "".join(f"{'R ' + g:>13}" for g in gammas))
    for method, barriers in anchor["barriers_b_to_c"].items():
        lines.append(
            f"   {method:<20}{barriers['test_loss']['mean']:>9.4f}{barriers['test_loss']['linear']:>8.4f}"
            f"{barriers['train_loss']['mean']:>9.4f}{barriers['train_loss']['linear']:>8.4f}"
            f"{100 * barriers['test_accuracy']['mean']:>11.2f}"
            + "".join(f"{anchor['alignment_b_to_c'][method][g]:>13.3f}" for g in gammas)
        )
    lines.append(f"   MergeMany ({merge['rounds']} rounds) vs the individual models (test):")
    rows = {**{f"model {k}": v for k, v in merge["individual"].items()}, "merged (MergeMany)": merge["merged"],
            "naive average": merge["naive_average"]}
    for name, values in rows.items():
        lines.append(f"   {name:<22}loss {values['test_loss']:.4f}  accuracy {100 * values['test_accuracy']:.2f}%")
    for g in gammas:
        alignment = ", ".join(f"{k} {v[g]:.3f}" for k, v in merge["alignment_to_models"].items())
        lines.append(f"   R ({g}) of the merged model to each aligned model: {alignment}")
    lines.append("")
    lines.append("3. The findings of Ito et al. on this data")
    for finding in report["findings"]:
        lines.append(f"   ({finding['number']}) {finding['claim']}: {finding['status'].upper()}.")
        lines.append(f"       {finding['evidence']}")
        lines.append(f"       criterion: {finding['criterion']}.")
    lines.append("")
    lines.append(f"Finished in {report['seconds']['total']:.1f} s; report and plots:")
    lines.extend(f"   {path}" for path in report["files"].values())
    return "\n".join(lines)
