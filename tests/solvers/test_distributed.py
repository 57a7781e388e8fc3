"""Distributed weight matching (gloo, 2 processes on CPU) finds the single process's permutations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import autoperm
from autoperm import PermutationSpec
from autoperm.errors import SolverError
from autoperm.solvers.collective import Placement, TorchCollective
from autoperm.solvers.distributed import shard_parameters

SPEC_PATH = Path(__file__).resolve().parents[2] / "specs" / "llama_tiny.yaml"

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


def _pair(spec: PermutationSpec, planted: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    sd_a = {name: torch.randn(shape, generator=generator) for name, shape in spec.shapes.items()}
    if planted:
        sd_b = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=3), sd_a)
        sd_b = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in sd_b.items()}
    else:
        sd_b = {name: torch.randn(shape, generator=generator) for name, shape in spec.shapes.items()}
    return sd_a, sd_b


def _worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        spec = PermutationSpec.from_yaml(SPEC_PATH)
        names = shard_parameters(spec, world_size)[rank]
        found = {}
        for planted in (True, False):
            sd_a, sd_b = _pair(spec, planted)
            result = autoperm.weight_matching(
                spec, {n: sd_a[n] for n in names}, {n: sd_b[n] for n in names}, seed=0, max_iter=30, distributed=True
            )
            found[planted] = {"perms": result.perms, "objective": result.objective, "n_iter": result.n_iter}
        torch.save(found, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    spec = PermutationSpec.from_yaml(SPEC_PATH)
    shards = shard_parameters(spec, 2)
    residual = spec.active_groups[0]  # the residual stream: its cost is summed over both ranks
    assert {rank for rank, shard in enumerate(shards) for m in residual.members if m.param in shard} == {0, 1}
    out = str(tmp_path / "result")
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, start_method="spawn")
    results = [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(2)]
    for planted in (True, False):
        sd_a, sd_b = _pair(spec, planted)
        single = autoperm.weight_matching(spec, sd_a, sd_b, seed=0, max_iter=30)
        assert single.n_iter > 1
        for rank, found in enumerate(results):
            found = found[planted]
            assert found["perms"].keys() == single.perms.keys()
            for name, permutation in single.perms.items():
                assert torch.equal(found["perms"][name], permutation), (planted, rank, name)
            assert found["n_iter"] == single.n_iter
            assert found["objective"] == pytest.approx(single.objective, rel=1e-9)
        if planted:
            aligned = autoperm.apply_permutation(spec, single.perms, sd_b)
            assert all(float((aligned[k] - sd_a[k]).abs().max()) < 0.5 for k in sd_a)


def _collective_worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        collective = TorchCollective()
        placement = Placement(collective, {"x": 0, "y": 1, "z": 1})
        found = {
            "rank": collective.rank,
            "all_sum": collective.all_sum(rank + 0.5),
            "reduce_sum": collective.reduce_sum(np.full(3, rank + 1.0), 0).tolist(),
            "broadcast": collective.broadcast({"from": rank}, 1),
            "all_gather": collective.all_gather([rank]),
            # held by rank 1 alone: its share is the whole cost; spread: the shares summed on rank 0
            "owned": placement.whole_cost(np.full((2, 2), 7.0) if rank == 1 else None, (2, 2), 1),
            "spread": placement.whole_cost(np.full((2, 2), rank + 1.0), (2, 2), None),
            "nothing": placement.whole_cost(None, (2, 2), None),
            "solved": placement.solve_on(1, lambda: f"solved on {rank}"),
        }
        torch.save(found, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_torch_collective_on_two_gloo_ranks(tmp_path: Path) -> None:
    out = str(tmp_path / "result")
    mp.start_processes(_collective_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, start_method="spawn")
    found = [torch.load(f"{out}.{rank}", weights_only=False) for rank in range(2)]
    for rank, result in enumerate(found):
        assert result["rank"] == rank
        assert result["all_sum"] == 2.0
        assert result["broadcast"] == {"from": 1}
        assert result["all_gather"] == [[0], [1]]
        assert result["solved"] == "solved on 1"
        assert result["nothing"] == (None, 0)
        owned, source = result["owned"]
        assert source == 1 and np.array_equal(owned, np.full((2, 2), 7.0 if rank == 1 else 0.0))
        spread, source = result["spread"]
        assert source == 0 and np.array_equal(spread, np.full((2, 2), 3.0 if rank == 0 else 0.0))
    assert found[0]["reduce_sum"] == [3.0, 3.0, 3.0]


def test_shards_cover_the_spec_and_keep_attention_blocks_together() -> None:
    spec = PermutationSpec.from_yaml(SPEC_PATH)
    for world_size in (1, 2, 3):
        shards = shard_parameters(spec, world_size)
        assert sorted(n for s in shards for n in s) == sorted(spec.shapes)
        rank_of = {n: r for r, s in enumerate(shards) for n in s}
        for group in spec.active_groups:
            fibres = [g for g in spec.active_groups if g.per == group.name]
            if fibres:
                assert len({rank_of[m.param] for g in (group, *fibres) for m in g.members}) == 1
    assert all(shard_parameters(spec, 2))  # both ranks get work


def test_distributed_needs_an_initialised_process_group() -> None:
    spec = PermutationSpec.from_yaml(SPEC_PATH)
    sd_a, sd_b = _pair(spec, planted=True)
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(SolverError, match="init_process_group"):
        autoperm.weight_matching(spec, sd_a, sd_b, distributed=True)
