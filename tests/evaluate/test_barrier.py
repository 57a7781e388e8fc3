"""Barrier formulas, interpolation curves and the BatchNorm reset."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autoperm.errors import AutopermError
from autoperm.evaluate import (
    InterpolationCurve,
    accuracy_barrier,
    interpolate_state_dicts,
    interpolation_curve,
    loss_barrier,
    reset_bn_stats,
)


def make_curve() -> InterpolationCurve:
    # L_A = 0.2, L_B = 0.4; the peak 1.0 sits at t = 0.25.
    return InterpolationCurve(
        t=(0.0, 0.25, 0.5, 0.75, 1.0),
        metrics={
            "test_loss": (0.2, 1.0, 0.9, 0.5, 0.4),
            "test_accuracy": (0.9, 0.5, 0.4, 0.7, 0.8),
        },
    )


def test_mean_loss_barrier_by_hand():
    # max L(t) - (0.2 + 0.4) / 2 = 1.0 - 0.3
    assert loss_barrier(make_curve(), kind="mean") == pytest.approx(0.7)


def test_linear_loss_barrier_by_hand():
    # gaps L(t) - (0.2 + 0.2 t): 0, 0.75, 0.6, 0.15, 0 -> 0.75
    assert loss_barrier(make_curve(), kind="linear") == pytest.approx(0.75)


def test_accuracy_barriers_by_hand():
    # mean: (0.9 + 0.8) / 2 - 0.4 = 0.45; linear: max (0.9 - 0.1 t) - acc(t) = 0.85 - 0.4 = 0.45 at t=0.5,
    # 0.875 - 0.5 = 0.375 at t=0.25, 0.825 - 0.7 = 0.125 at t=0.75
    assert accuracy_barrier(make_curve(), kind="mean") == pytest.approx(0.45)
    assert accuracy_barrier(make_curve(), kind="linear") == pytest.approx(0.45)


def test_convex_curve_has_no_linear_barrier_and_negative_mean_barrier():
    curve = InterpolationCurve(t=(0.0, 0.5, 1.0), metrics={"loss": (1.0, 0.5, 1.0)})
    assert loss_barrier(curve, kind="linear") == pytest.approx(0.0)
    assert loss_barrier(curve, kind="mean") == pytest.approx(0.0)
    dip = InterpolationCurve(t=(0.0, 0.5, 1.0), metrics={"loss": (1.0, 0.5, 0.0)})
    assert loss_barrier(dip, kind="mean") == pytest.approx(0.5)  # L_A exceeds the mean of the ends


def test_metric_choice_and_errors():
    curve = InterpolationCurve(
        t=(0.0, 1.0), metrics={"train_loss": (0.0, 0.0), "test_loss": (1.0, 3.0), "val_loss": (5.0, 5.0)}
    )
    assert loss_barrier(curve) == pytest.approx(1.0)  # test_loss preferred
    assert loss_barrier(curve, metric="train_loss") == 0.0
    with pytest.raises(AutopermError, match="no metric"):
        loss_barrier(curve, metric="nope")
    with pytest.raises(AutopermError, match="kind"):
        loss_barrier(curve, kind="max")  # type: ignore[arg-type]
    with pytest.raises(AutopermError, match="which accuracy"):
        accuracy_barrier(curve)


def test_curve_round_trip_and_length_check():
    curve = make_curve()
    assert InterpolationCurve.from_dict(curve.to_dict()) == curve
    with pytest.raises(ValueError):
        InterpolationCurve(t=(0.0, 1.0), metrics={"loss": (1.0,)})


def linear_model(weight: float) -> nn.Linear:
    layer = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(weight)
    return layer


def test_interpolation_curve_matches_direct_evaluation_and_leaves_inputs_alone():
    # y = w x with squared loss against y = x: L(w) = mean(x^2) (w - 1)^2, evaluated directly.
    x = torch.linspace(-1, 1, 50)[:, None]
    model = linear_model(3.0)
    sd_a = linear_model(0.0).state_dict()
    sd_b = linear_model(2.0).state_dict()
    before = {k: v.clone() for k, v in sd_a.items()}
    curve = interpolation_curve(
        model, sd_a, sd_b, {"test": (x, x)}, num_points=5, loss_fn=nn.functional.mse_loss
    )
    assert curve.t == (0.0, 0.25, 0.5, 0.75, 1.0)
    expected = [float((x**2).mean()) * (2 * t - 1) ** 2 for t in curve.t]
    assert curve["test_loss"] == pytest.approx(expected, rel=1e-5)
    assert "test_accuracy" not in curve.metrics  # regression: no accuracy
    assert loss_barrier(curve) == pytest.approx(0.0, abs=1e-6)  # the minimum is in the middle
    assert model.weight.item() == 3.0
    assert torch.equal(sd_a["weight"], before["weight"])


def test_interpolation_curve_with_callable_evaluator():
    sd_a = linear_model(0.0).state_dict()
    sd_b = linear_model(4.0).state_dict()
    curve = interpolation_curve(linear_model(0.0), sd_a, sd_b, lambda m: {"w": m.weight.item()}, num_points=3)
    assert curve["w"] == pytest.approx((0.0, 2.0, 4.0))


def test_interpolation_curve_rejects_mismatched_state_dicts():
    with pytest.raises(AutopermError, match="differ"):
        interpolation_curve(linear_model(0.0), {"weight": torch.zeros(1, 1)}, {"bias": torch.zeros(1)}, lambda m: {})
    with pytest.raises(AutopermError, match="shape"):
        interpolation_curve(linear_model(0.0), {"weight": torch.zeros(1, 1)}, {"weight": torch.zeros(1, 2)}, lambda m: {})
    with pytest.raises(AutopermError, match="num_points"):
        sd = linear_model(0.0).state_dict()
        interpolation_curve(linear_model(0.0), sd, sd, lambda m: {}, num_points=1)


def test_data_that_does_not_fit_the_model_is_a_clear_error():
    sd = linear_model(1.0).state_dict()
    with pytest.raises(AutopermError, match=r"shape \[4, 3\].*fit the model"):
        interpolation_curve(linear_model(1.0), sd, sd, (torch.zeros(4, 3), torch.zeros(4)), num_points=2)


def test_interpolate_keeps_integer_buffers_from_a():
    net_a, net_b = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    net_a.num_batches_tracked.fill_(7)
    net_b.num_batches_tracked.fill_(100)
    net_b.running_mean.fill_(2.0)
    mixed = interpolate_state_dicts(net_a.state_dict(), net_b.state_dict(), 0.25)
    assert mixed["num_batches_tracked"].item() == 7
    assert torch.allclose(mixed["running_mean"], torch.full((3,), 0.5))


def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3))


def test_reset_bn_stats_is_the_cumulative_average_over_batches():
    net = bn_net()
    net.eval()
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 4, generator=generator) * 3 + 1, torch.zeros(n)) for n in (10, 7, 13)]
    # Manual reference: per batch mean and unbiased variance of the first BN's input, averaged
    # with equal weight per batch (momentum=None is a cumulative moving average of batch statistics).
    with torch.no_grad():
        hidden = [net[0](x) for x, _ in batches]
    expected_mean = torch.stack([h.mean(0) for h in hidden]).mean(0)
    expected_var = torch.stack([h.var(0, unbiased=True) for h in hidden]).mean(0)
    momentum = net[1].momentum

    returned = reset_bn_stats(net, batches)

    assert returned is net
    assert torch.allclose(net[1].running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(net[1].running_var, expected_var, atol=1e-4)
    assert net[1].num_batches_tracked.item() == 3
    assert net[1].momentum == momentum  # restored
    assert not net.training and not net[1].training  # mode restored
    # The stats moved far from the initial zeros / ones.
    assert not torch.allclose(net[1].running_mean, torch.zeros(6), atol=1e-2)


def test_reset_bn_is_applied_to_every_interpolated_model():
    net = bn_net()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(3))
    sd_a = net.state_dict()
    other = bn_net()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    sd_b = other.state_dict()

    def stats(model: nn.Module) -> dict[str, float]:
        return {"mean0": model[1].running_mean[0].item()}

    plain = interpolation_curve(net, sd_a, sd_b, stats, num_points=3)
    reset = interpolation_curve(net, sd_a, sd_b, stats, num_points=3, reset_bn=(x, y))
    assert plain["mean0"] == pytest.approx((0.0, 0.0, 0.0))  # fresh BNs, interpolated zeros
    for t, value in zip(reset.t, reset["mean0"]):
        mixed = bn_net()
        mixed.load_state_dict(interpolate_state_dicts(sd_a, sd_b, t))
        with torch.no_grad():
            assert value == pytest.approx(mixed[0](x)[:, 0].mean().item(), abs=1e-5)
    assert net[1].running_mean.abs().max().item() == 0.0  # the user's model is untouched
