"""The collectives weight matching runs through: the local one is the identity, placements are checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tests._specs import MLP, mlp_spec

from autoperm.errors import SolverError
from autoperm.solvers.collective import LocalCollective, Placement, place


class _TwoRanksAlike(LocalCollective):
    """Rank 0 of two ranks that hold the same shard (so every tensor has two holders)."""

    def all_gather(self, value):
        return [value, value]


def _shards():
    torch.manual_seed(0)
    model = MLP(in_features=6, hidden=5, depth=2, num_classes=3)
    return mlp_spec(model), model.state_dict()


def test_local_collective_is_the_identity() -> None:
    collective = LocalCollective()
    array = np.arange(6.0).reshape(2, 3)
    assert collective.rank == 0
    assert collective.all_sum(2.5) == 2.5
    assert collective.reduce_sum(array, 0) is array
    marker = object()
    assert collective.broadcast(marker, 0) is marker
    assert collective.all_gather(["w"]) == [["w"]]


def test_local_placement_holds_every_cost_tensor_and_solves_here() -> None:
    spec, state = _shards()
    placement = place(spec, state, state, LocalCollective())
    assert list(placement.holder) == [name for name in spec.members_by_param if name in state]
    assert set(placement.holder.values()) == {0}
    assert placement.single_holder(state) == 0
    cost = np.ones((3, 3))
    assert placement.whole_cost(cost, (3, 3), owner=0) == (cost, 0)
    assert placement.whole_cost(None, (3, 3), owner=0) == (None, 0)
    assert placement.solve_on(0, lambda: "solved") == "solved"


def test_single_holder_tells_spread_tensors_apart() -> None:
    placement = Placement(LocalCollective(), {"a": 0, "b": 1, "c": 1})
    assert placement.single_holder({"b", "c", "running_mean"}) == 1
    assert placement.single_holder({"a", "b"}) is None
    assert placement.single_holder({"not a cost tensor"}) == 0


def test_place_names_the_tensor_at_fault() -> None:
    spec, state = _shards()
    with pytest.raises(SolverError, match="held by ranks 0 and 1"):
        place(spec, state, state, _TwoRanksAlike())
    partial = {k: v for k, v in state.items() if k != "head.weight"}
    with pytest.raises(SolverError, match="no rank holds the cost tensor.*head.weight"):
        place(spec, partial, partial, LocalCollective())
    with pytest.raises(SolverError, match="rank 0: shards of A and B hold different tensors"):
        place(spec, state, partial, LocalCollective())
    wrong = {**state, "head.weight": torch.zeros(2, 2)}
    with pytest.raises(SolverError, match="B's 'head.weight' has shape"):
        place(spec, state, wrong, LocalCollective())
