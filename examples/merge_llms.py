"""Merge fine-tuned LLMs kept as Hugging Face directories (``save_pretrained`` output).

With model directories given, runs ``autoperm merge DIR DIR ... -o OUT``: the model class comes
from the first directory's ``config.json``, weights are read lazily from (sharded) safetensors,
and OUT is a directory in the same layout that ``from_pretrained`` loads:

    python examples/merge_llms.py --models ./llama-ft-a ./llama-ft-b --out ./llama-merged

Without ``--models`` it first creates two small fine-tunes locally (no download): a tiny
LLaMA base (grouped-query attention, RoPE, SwiGLU) fine-tuned on two synthetic token tasks,
the second one saved with its hidden units reordered as an independently trained model's would
be. It then compares, on held-out tokens of both tasks, each fine-tune, the plain average of
the two and autoperm's merge (MergeMany: weight matching, then the mean).

    python examples/merge_llms.py --workdir ./llm-merge-demo
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", type=Path, help="Two or more model directories (default: create two).")
    parser.add_argument("--out", type=Path, help="Merged model directory (default: WORKDIR/merged).")
    parser.add_argument("--workdir", type=Path, default=Path("llm-merge-demo"), help="Where created models go.")
    parser.add_argument("--steps", type=int, default=60, help="Fine-tuning steps of the created models.")
    parser.add_argument("--max-iter", type=int, default=100, help="Most MergeMany rounds.")
    return parser


def _task_batch(task: int, generator: torch.Generator, vocab: int, batch: int = 16, length: int = 24) -> torch.Tensor:
    """Task 0 counts up, task 1 counts down (mod vocab) from a random start: learnable by a tiny model."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    step = 1 if task == 0 else -1
    return (start + step * torch.arange(length)) % vocab


def create_finetunes(workdir: Path, steps: int) -> list[Path]:
    """A tiny base LLaMA, fine-tuned on two tasks; the second saved with permuted hidden units."""
    import transformers

    import autoperm

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    paths = []
    for task in (0, 1):
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(base.state_dict())
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        generator = torch.Generator().manual_seed(10 + task)
        for _ in range(steps):
            tokens = _task_batch(task, generator, config.vocab_size)
            loss = model(input_ids=tokens, labels=tokens).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if task == 1:  # reorder its hidden units, as an independently trained model's are
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                spec = autoperm.infer_spec(model, torch.zeros(1, 8, dtype=torch.long))
            model.load_state_dict(autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=3), model.state_dict()))
        path = workdir / f"finetune-{task}"
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path, max_shard_size="200KB")
        paths.append(path)
    return paths


def held_out_loss(path_or_model, tasks=(0, 1)) -> float:
    """Mean next-token loss on held-out batches of both tasks."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path_or_model) if isinstance(path_or_model, Path) else path_or_model
    model.eval()
    losses = []
    with torch.no_grad():
        for task in tasks:
            tokens = _task_batch(task, torch.Generator().manual_seed(99 + task), model.config.vocab_size)
            losses.append(model(input_ids=tokens, labels=tokens).loss.item())
    return sum(losses) / len(losses)


def plain_average(paths: list[Path]):
    import transformers

    models = [transformers.AutoModelForCausalLM.from_pretrained(p) for p in paths]
    averaged = {k: torch.stack([m.state_dict()[k].float() for m in models]).mean(0) for k in models[0].state_dict()}
    models[0].load_state_dict(averaged)
    return models[0]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    created = args.models is None
    paths = create_finetunes(args.workdir, args.steps) if created else args.models
    out = args.out or args.workdir / "merged"
    if out.exists():
        sys.exit(f"{out} exists; remove it or give --out")
    command = [sys.executable, "-m", "autoperm", "merge", *map(str, paths), "-o", str(out), "--max-iter", str(args.max_iter)]
    print("$", " ".join(["python", "-m", "autoperm", *command[3:]]))
    subprocess.run(command, check=True)
    if created:
        for path in paths:
            print(f"{path.name:>16}: held-out loss {held_out_loss(path):.3f}")
        print(f"{'plain average':>16}: held-out loss {held_out_loss(plain_average(paths)):.3f}")
        print(f"{'autoperm merge':>16}: held-out loss {held_out_loss(out):.3f}")


if __name__ == "__main__":
    main()
