"""Distributed weight matching (gloo, 2 processes on CPU) finds the single process's permutations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import autoperm
from autoperm import PermutationSpec
from autoperm.errors import SolverError
from autoperm.solvers.distributed import shard_parameters

SPEC_PATH = Path(__file__).resolve().parents[1] / "specs" / "llama_tiny.yaml"

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
