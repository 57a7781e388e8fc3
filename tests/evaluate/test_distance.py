"""L2 distance between parameter vectors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from autoperm.errors import AutopermError
from autoperm.evaluate import l2_distance


def test_distance_by_hand():
    sd_a = {"w": torch.tensor([[3.0, 0.0]]), "b": torch.tensor([0.0])}
    sd_b = {"w": torch.tensor([[0.0, 4.0]]), "b": torch.tensor([0.0])}
    distance = l2_distance(sd_a, sd_b)
    assert distance.absolute == pytest.approx(5.0)
    assert distance.norm_a == pytest.approx(3.0)
    assert distance.norm_b == pytest.approx(4.0)
    assert distance.relative == pytest.approx(5.0 / math.sqrt((9 + 16) / 2))


def test_identical_is_zero_and_independent_is_about_sqrt2():
    generator = torch.Generator().manual_seed(0)
    sd_a = {"w": torch.randn(200, 200, generator=generator)}
    sd_b = {"w": torch.randn(200, 200, generator=generator)}
    assert l2_distance(sd_a, sd_a).absolute == 0.0
    assert l2_distance(sd_a, sd_b).relative == pytest.approx(math.sqrt(2), rel=0.02)


def test_batchnorm_statistics_are_excluded():
    bn_a, bn_b = nn.BatchNorm1d(4), nn.BatchNorm1d(4)
    bn_b.running_mean.fill_(100.0)
    bn_b.running_var.fill_(50.0)
    bn_b.num_batches_tracked.fill_(9)
    assert l2_distance(bn_a.state_dict(), bn_b.state_dict()).absolute == 0.0
    with torch.no_grad():
        bn_b.weight.fill_(3.0)  # learned scale: counted (4 entries differ by 2)
    assert l2_distance(bn_a.state_dict(), bn_b.state_dict()).absolute == pytest.approx(4.0)


def test_mismatch_and_empty_raise():
    with pytest.raises(AutopermError, match="differ"):
        l2_distance({"w": torch.zeros(2)}, {"v": torch.zeros(2)})
    with pytest.raises(AutopermError, match="no floating-point"):
        l2_distance({"n": torch.zeros(2, dtype=torch.long)}, {"n": torch.ones(2, dtype=torch.long)})
