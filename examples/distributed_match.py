"""Weight matching of two large models over several processes (one per GPU), with torchrun.

Each rank memory-maps both safetensors checkpoints and touches only its slice of the layers
(:func:`autoperm.solvers.distributed.shard_parameters`); the ranks sum the costs of groups that
span them and share every assignment, so the result equals one process's. Rank 0 writes the
permutations (``torch.save`` of ``{group: LongTensor}``, atomically).

    autoperm spec transformers:LlamaForCausalLM --kwargs use_cache=False ... -o spec.yaml
    torchrun --nproc-per-node 8 examples/distributed_match.py --spec spec.yaml \
        --a a.safetensors --b b.safetensors --out perms.pt            # NCCL, one GPU per rank
    torchrun --nproc-per-node 2 examples/distributed_match.py --device cpu ...   # gloo on CPU

Apply the result with ``autoperm.apply_permutation(spec, torch.load("perms.pt"), state_dict_b)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

import autoperm
from autoperm.solvers.distributed import shard_parameters
from autoperm.io import mmap_safetensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="the permutation spec (YAML)")
    parser.add_argument("--a", required=True, help="model A (safetensors), the reference")
    parser.add_argument("--b", required=True, help="model B (safetensors), to permute")
    parser.add_argument("--out", required=True, help="where rank 0 writes the permutations (.pt)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        spec = autoperm.PermutationSpec.from_yaml(args.spec)
        names = shard_parameters(spec, dist.get_world_size())[dist.get_rank()]
        a, b = mmap_safetensors(args.a), mmap_safetensors(args.b)
        result = autoperm.weight_matching(
            spec, {n: a[n] for n in names}, {n: b[n] for n in names},
            max_iter=args.max_iter, seed=args.seed, device=device, distributed=True,
        )
        if dist.get_rank() == 0:
            out = Path(args.out)
            handle, temporary = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", suffix=".tmp")
            os.close(handle)
            torch.save(result.perms, temporary)
            os.replace(temporary, out)
            logging.info("objective %.6g after %d sweeps; permutations in %s", result.objective, result.n_iter, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
