"""Linear mode connectivity across model families, with and without REPAIR.

For each family, trains three models from different seeds on data that ships with a package
(scikit-learn's handwritten digits as 1x8x8 images; for the language model, bytes of the Python
standard library's own source files), aligns B (and C) to A by weight matching (WM), activation
matching (AM) and the straight-through estimator (STE), and reports:

- barriers (Git Re-Basin's ``max_t L(t) - (L_A + L_B)/2``) on train and test, loss and
  accuracy, naive and after each method, each with and without REPAIR (Jordan et al.,
  arXiv 2211.08403); BatchNorm statistics are recomputed at every point of every curve;
- the anchor scheme of Ito et al. (arXiv 2402.04051): B and C each aligned to A (WM, STE), and
  the barrier between the two aligned models;
- the L2 distance and the pooled singular-vector alignment R at gamma 0 and 0.3;
- the generalised rows (:data:`GENERALISED`: orthogonal and invertible maps, learned refinement);
  ``--rows`` computes only the methods named (naive always);
- a width trend for one family (the MLP by default);
- with ``--three-models``, the three-model comparison of Ito et al. over several independent
  triples of models (``--triples``, 3 by default): the anchor scheme with WM against STE at the
  literature's step budget (``--ste-steps``, 2,300 Adam steps of batch 256 as STE-MM runs it),
  and MergeMany, as mean and std.

Training recipes (``--recipe``): ``own`` (Adam, each family's epochs) or ``authors``, the
recipes of Ito et al.'s follow-up code (e5-a/STE-MM ``scripts/run_train.sh``): the MLP with Adam
1e-3, 5 epochs, batch 500; VGG and ResNet with SGD momentum 0.9, lr 0.4, weight decay 5e-4,
batch 500, 100 epochs, linear warm-up over 5 epochs then linear decay to 0, random 4-pixel crops
and horizontal flips. On digits' 8x8 images the crop is scaled to 1 pixel (4 of 32) and flips
are left out (a mirrored digit is another symbol). The authors give no recipe for the ViT or the
language model; those keep their own.

Families: ``mlp`` (3 hidden layers), ``vgg`` (VGG-style CNN with BatchNorm, flatten head),
``resnet`` (BatchNorm, 2 stages of 2 basic blocks), ``vit`` (16 patch tokens, 4 heads, 3 blocks,
LayerNorm), ``gpt`` (causal byte-level language model with tied embeddings, next-token loss),
``hf-vit`` and ``hf-gpt2`` (the same from transformers' classes), and ``gpt-untied`` and
``hf-gpt2-untied`` (the language models with a separate output layer).

Run from the repository root::

    python benchmarks/lmc_families.py                     # every family, default sizes
    python benchmarks/lmc_families.py --families mlp vgg --quick
    python benchmarks/lmc_families.py --out lmc-report --widths 64 256 1024   # a wider trend (slower)
    python benchmarks/lmc_families.py --recipe authors --three-models --triples 3   # Ito et al.'s comparison
    python benchmarks/lmc_families.py --families vgg --rows wm gwm-full+learn gwm-full+learn-all --widths

Writes ``report.json`` and plots (barrier curves per family, R per layer) into ``--out`` and
prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import sysconfig
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

import autoperm
from autoperm import Repairer
from autoperm.evaluate import InterpolationCurve, barrier_summary, interpolation_curve
from autoperm.io import write_text_atomic
from autoperm.models import MLP
from autoperm.models.resnet import BasicBlock
from autoperm.solvers import mean_state_dict
from autoperm.trace import GraphRunner

StateDict = dict[str, torch.Tensor]
Split = tuple[torch.Tensor, torch.Tensor]

logger = logging.getLogger("lmc_families")


# ----------------------------------------------------------------------------- models
class VGG(nn.Module):
    """VGG-style CNN for 1x8x8 inputs: (conv-BN-ReLU) x2, pool, (conv-BN-ReLU) x2, pool, flatten, linear."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        w = width
        layers: list[nn.Module] = []
        channels = 1
        for out, pool in ((w, False), (w, True), (2 * w, False), (2 * w, True)):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class SmallResNet(nn.Module):
    """ResNet with BatchNorm for 1x8x8 inputs: stem, 2 stages of 2 basic blocks, pooling, linear."""

    def __init__(self, width: int = 32, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, stride=2), BasicBlock(2 * width, 2 * width))
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: multi-head self-attention and a GELU MLP."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1 = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        h = self.ln1(x)
        q, k, v = (layer(h).view(batch, tokens, self.heads, -1).transpose(1, 2) for layer in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """ViT-style classifier: 2x2 patches of a 1x8x8 image (16 tokens), learned positions, mean pooling."""

    def __init__(self, width: int = 64, heads: int = 4, depth: int = 3, num_classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(1, width, 2, stride=2)
        self.position = nn.Parameter(0.02 * torch.randn(16, width))
        self.blocks = nn.Sequential(*(Block(width, heads, causal=False) for _ in range(depth)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.ln(self.blocks(tokens)).mean(1))


class GPT(nn.Module):
    """Causal byte-level language model (GPT-style, pre-LayerNorm), input and output embeddings tied
    unless ``tied=False`` (then a separate bias-free ``head``)."""

    def __init__(self, width: int = 96, heads: int = 4, depth: int = 2, context: int = 64, vocab: int = 256,
                 tied: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(context, width))
        self.blocks = nn.Sequential(*(Block(width, heads, causal=True) for _ in range(depth)))
        self.ln = nn.LayerNorm(width)
        self.head = None if tied else nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        hidden = self.ln(self.blocks(x))
        return F.linear(hidden, self.embed.weight) if self.head is None else self.head(hidden)


class Logits(nn.Module):
    """A Hugging Face model as a plain ``inputs -> logits`` module (its state dict under ``model.``)."""

    def __init__(self, model: nn.Module, keyword: str):
        super().__init__()
        self.model, self.keyword = model, keyword

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.keyword: inputs}).logits


def hf_vit(width: int) -> nn.Module:
    """transformers' ``ViTForImageClassification`` on 1x8x8 digits: 2x2 patches, 4 heads, 3 blocks, CLS head."""
    import transformers

    config = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=width, num_hidden_layers=3,
                                    num_attention_heads=4, intermediate_size=2 * width, num_labels=10)
    return Logits(transformers.ViTForImageClassification(config), "pixel_values")


def hf_gpt2(width: int, tied: bool = True) -> nn.Module:
    """transformers' ``GPT2LMHeadModel`` over bytes (tied embeddings as GPT-2 has them, unless ``tied=False``):
    2 blocks, 4 heads."""
    import transformers

    config = transformers.GPT2Config(n_embd=width, n_layer=2, n_head=4, vocab_size=256, n_positions=64,
                                     tie_word_embeddings=tied)
    return Logits(transformers.GPT2LMHeadModel(config), "input_ids")


# ------------------------------------------------------------------------------- data
def digits(flat: bool) -> dict[str, Split]:
    data = autoperm.load_digits()
    shape = (-1, 64) if flat else (-1, 1, 8, 8)
    return {split: (x.reshape(shape), y) for split, (x, y) in data.splits().items()}


def digits_images() -> dict[str, Split]:
    """Digits as 1x8x8 images, for the CLI: ``--data benchmarks.lmc_families:digits_images``."""
    return digits(flat=False)


def stdlib_text(context: int, train_windows: int, test_windows: int, max_bytes: int = 3_000_000) -> dict[str, Any]:
    """Byte tokens of the standard library's ``.py`` files (every 10th file held out for test)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    streams: dict[str, list[bytes]] = {"train": [], "test": []}
    sizes = {"train": 0, "test": 0}
    for index, path in enumerate(files):
        split = "test" if index % 10 == 0 else "train"
        if sizes[split] >= (max_bytes if split == "train" else max_bytes // 9):
            continue
        raw = path.read_bytes()
        streams[split].append(raw)
        sizes[split] += len(raw)
    tokens = {split: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long() for split, parts in streams.items()}
    generator = torch.Generator().manual_seed(0)

    def windows(stream: torch.Tensor, count: int) -> Split:
        starts = torch.randint(0, stream.numel() - context - 1, (count,), generator=generator)
        chunk = torch.stack([stream[s: s + context + 1] for s in starts.tolist()])
        return chunk[:, :-1], chunk[:, 1:]

    return {"stream": tokens["train"], "train": windows(tokens["train"], train_windows),
            "test": windows(tokens["test"], test_windows), "bytes": sizes}


def sequence_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for classifier logits ``(N, C)`` or next-token logits ``(N, T, V)``."""
    if outputs.dim() == 3:
        return F.cross_entropy(outputs.flatten(0, 1), targets.flatten())
    return F.cross_entropy(outputs, targets)


def evaluator(splits: Mapping[str, Split], batch_size: int = 512) -> Callable[[nn.Module], dict[str, float]]:
    """``model -> {split_loss, split_accuracy}`` (accuracy of the argmax, per token for language models)."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        metrics = {}
        with torch.no_grad():
            for split, (inputs, targets) in splits.items():
                total, correct, count = 0.0, 0, 0
                for start in range(0, len(inputs), batch_size):
                    x, y = inputs[start: start + batch_size], targets[start: start + batch_size]
                    out = model(x)
                    total += float(sequence_loss(out, y)) * y.numel()
                    correct += int((out.argmax(-1) == y).sum())
                    count += y.numel()
                metrics[f"{split}_loss"], metrics[f"{split}_accuracy"] = total / count, correct / count
        return metrics

    return evaluate


# ---------------------------------------------------------------------------- families
GENERALISED: tuple[tuple[str, str, str, str], ...] = (
    ("gwm-orth", "orthogonal", "", "wm"),
    ("gwm-full", "full", "", "wm"),
    ("gwm-full+learn", "full", "maps", "wm"),
    ("gwm-full+learn-all", "full", "every", "wm"),
    ("gam-orth", "orthogonal", "", "act"),
    ("gam-full", "full", "", "act"),
)
"""The generalised rows: (method, symmetries, what is learned on the midpoint loss for the
family's ``refine_steps`` Adam steps: nothing, the continuous maps (``maps``; 300 steps, as the
issue's prototype ran them), or every map (``every``: the permutations straight-through too, their
copy at STE-MM's lr 1e-3), and how the maps are found: ``wm`` generalised weight matching, ``act``
generalised activation matching on the train split, batches of 512 as ``am``). The learning
rates and batch below were fixed before any run."""
REFINE_LR = 1e-2
REFINE_BATCH = 128
METHODS = ("naive", "wm", "am", "ste", *(name for name, *_ in GENERALISED))

@dataclass(frozen=True)
class Family:
    """How to build, train and feed one family."""

    name: str
    build: Callable[[int, int], nn.Module]   # (width, seed) -> model
    width: int
    data: str                                # "flat", "image" or "text"
    epochs: int
    lr: float = 1e-3
    batch_size: int = 64
    steps: int = 0                           # language model: optimiser steps instead of epochs
    ste_epochs: int = 4
    refine_steps: int = 300
    optimizer: str = "adam"                  # "adam", or "sgd" (momentum 0.9)
    weight_decay: float = 0.0
    warmup_epochs: int = 0                   # sgd: linear warm-up, then linear decay to 0
    crop: int = 0                            # images: random crops after padding by this many pixels
    recipe: str = "own"


def _seeded(factory: Callable[[int], nn.Module]) -> Callable[[int, int], nn.Module]:
    def build(width: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return factory(width)

    return build


FAMILIES: dict[str, Family] = {
    "mlp": Family("mlp", _seeded(lambda w: MLP(in_features=64, hidden=w, depth=3)), 256, "flat", epochs=30),
    "vgg": Family("vgg", _seeded(lambda w: VGG(w)), 32, "image", epochs=20),
    "resnet": Family("resnet", _seeded(lambda w: SmallResNet(w)), 32, "image", epochs=20),
    "vit": Family("vit", _seeded(lambda w: ViT(w)), 64, "image", epochs=40, lr=2e-3),
    "gpt": Family("gpt", _seeded(lambda w: GPT(w)), 96, "text", epochs=0, lr=3e-3, batch_size=32, steps=800, ste_epochs=20),
    "hf-vit": Family("hf-vit", _seeded(hf_vit), 64, "image", epochs=40, lr=2e-3),
    "hf-gpt2": Family("hf-gpt2", _seeded(hf_gpt2), 96, "text", epochs=0, lr=3e-3, batch_size=32, steps=800, ste_epochs=20),
    "gpt-untied": Family("gpt-untied", _seeded(lambda w: GPT(w, tied=False)), 96, "text", epochs=0, lr=3e-3,
                         batch_size=32, steps=800, ste_epochs=20),
    "hf-gpt2-untied": Family("hf-gpt2-untied", _seeded(lambda w: hf_gpt2(w, tied=False)), 96, "text", epochs=0,
                             lr=3e-3, batch_size=32, steps=800, ste_epochs=20),
}
"""``hf-vit`` and ``hf-gpt2`` are the ``vit`` and ``gpt`` settings built from transformers' own classes
(dropout left at the libraries' defaults, 0 for ViT, 0.1 for GPT-2, and off in evaluation). The
``-untied`` language models are the same with a separate output layer: with tied embeddings the
final LayerNorm's gain cannot be folded into the output layer without changing the embedding, so
the residual stream admits only permutations; untied, it admits orthogonal maps after folding."""


def authors_recipe(family: Family) -> Family:
    """The family trained as Ito et al.'s follow-up code trains it (see the module doc); ViT and GPT unchanged."""
    if family.name == "mlp":
        return replace(family, epochs=5, lr=1e-3, batch_size=500, recipe="authors")
    if family.name in ("vgg", "resnet"):
        return replace(family, epochs=100, lr=0.4, batch_size=500, optimizer="sgd", weight_decay=5e-4,
                       warmup_epochs=5, crop=1, recipe="authors")
    return family


def quick(family: Family) -> Family:
    """The CI-sized variant: narrow, few epochs."""
    return replace(family, width=max(8, family.width // 4), epochs=min(family.epochs, 4), steps=min(family.steps, 60),
                   ste_epochs=1, warmup_epochs=min(family.warmup_epochs, 1), refine_steps=5)


def train(family: Family, model: nn.Module, splits: Mapping[str, Any], seed: int, bar: tqdm) -> nn.Module:
    """Cross-entropy training by the family's recipe; classifiers by epochs over the train split, the LM by random windows."""
    optimizer: torch.optim.Optimizer
    if family.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=family.lr, momentum=0.9, weight_decay=family.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=family.lr, weight_decay=family.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    if family.data == "text":
        stream, context = splits["stream"], splits["train"][0].shape[1]
        for _ in range(family.steps):
            starts = torch.randint(0, stream.numel() - context - 1, (family.batch_size,), generator=generator)
            chunk = torch.stack([stream[s: s + context + 1] for s in starts.tolist()])
            optimizer.zero_grad()
            sequence_loss(model(chunk[:, :-1]), chunk[:, 1:]).backward()
            optimizer.step()
            bar.update(1)
    else:
        inputs, targets = splits["train"]
        per_epoch = -(-len(inputs) // family.batch_size)
        schedule = _schedule(optimizer, family, per_epoch)
        for _ in range(family.epochs):
            order = torch.randperm(len(inputs), generator=generator)
            for start in range(0, len(inputs), family.batch_size):
                index = order[start: start + family.batch_size]
                batch = _random_crops(inputs[index], family.crop, generator) if family.crop else inputs[index]
                optimizer.zero_grad()
                F.cross_entropy(model(batch), targets[index]).backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
            bar.update(1)
    return model.eval()


def _schedule(optimizer: torch.optim.Optimizer, family: Family, per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR | None:
    """SGD: linear warm-up over ``warmup_epochs``, then linear decay to 0 at the last step (per step)."""
    if family.optimizer != "sgd":
        return None
    warmup, total = family.warmup_epochs * per_epoch, family.epochs * per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _random_crops(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by up to ``padding`` pixels: zero-padded, then cropped back at a random offset."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (padding, padding, padding, padding))
    offsets = torch.randint(0, 2 * padding + 1, (len(images), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, y: y + height, x: x + width] for i, (y, x) in enumerate(offsets)])


def _barriers(curve: InterpolationCurve) -> dict[str, float]:
    summary = barrier_summary(curve)
    return {name: values["mean"] for name, values in summary.items()}


@dataclass
class Context:
    family: Family
    model: nn.Module
    spec: autoperm.PermutationSpec
    splits: dict[str, Any]
    points: int
    evaluate: Callable[[nn.Module], dict[str, float]]
    bn: bool

    def curve(self, sd_a: StateDict, sd_b: StateDict, repaired: bool, bar: tqdm) -> InterpolationCurve:
        transform = None
        if repaired:
            transform = Repairer(self.spec, self.model, sd_a, sd_b, self.splits["train"], batch_size=512)
        return interpolation_curve(
            self.model, sd_a, sd_b, self.evaluate, num_points=self.points,
            reset_bn=self.splits["train"] if self.bn else None, transform=transform,
            progress=lambda done, total: bar.update(1),
        )


def _trained_triple(family: Family, seed: int, points: int, label: str) -> tuple[Any, ...]:
    """Three models of ``family`` trained from seeds ``seed..seed+2``: the first module, their
    state dicts, the spec, the evaluation context, the evaluation splits and an example input."""
    splits, eval_splits, example = _family_data(family)
    with tqdm(total=(family.steps or family.epochs) * 3, desc=f"{family.name}: {label}", file=sys.stderr, leave=False) as bar:
        models = [train(family, family.build(family.width, s), splits, s, bar) for s in (seed, seed + 1, seed + 2)]
    model = models[0]
    spec = autoperm.infer_spec(model, example)
    bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    context = Context(family, model, spec, splits, points, evaluator(eval_splits), bn)
    return model, [_snapshot(m) for m in models], spec, context, eval_splits, example


def run_family(family: Family, points: int, widths: Sequence[int] = (), seed: int = 0,
               rows_asked: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything for one family (or only the methods ``rows_asked``, with naive); returns its part
    of the report (curves included). The anchor scheme needs ``wm`` and ``ste``."""
    started = time.perf_counter()
    model, (sd_a, sd_b, sd_c), spec, context, eval_splits, example = _trained_triple(family, seed, points, "training 3 models")
    splits = context.splits
    train_data = splits["train"]
    loss_fn = sequence_loss
    endpoints = {label: context.evaluate(_loaded(model, sd)) for label, sd in (("A", sd_a), ("B", sd_b), ("C", sd_c))}

    timings: dict[str, float] = {}
    aligned: dict[str, StateDict] = {"naive": sd_b}
    for method in ("wm", "am", "ste"):
        if rows_asked is not None and method not in rows_asked:
            continue
        tick = time.perf_counter()
        if method == "wm":
            result = autoperm.weight_matching(spec, sd_a, sd_b, seed=seed)
        elif method == "am":
            result = autoperm.activation_matching(spec, model, sd_a, sd_b, train_data, batch_size=512, seed=seed)
        else:
            result = autoperm.ste_matching(spec, model, sd_a, sd_b, train_data, loss_fn=loss_fn, epochs=family.ste_epochs,
                                           batch_size=128, seed=seed)
        timings[method] = time.perf_counter() - tick
        aligned[method] = autoperm.apply_permutation(spec, result.perms, sd_b)
    # generalised symmetries (Theus et al., arXiv 2506.22712): B in A's gauge, paired with A as it is
    for method, symmetries, learn, found_by in GENERALISED:
        if rows_asked is not None and method not in rows_asked:
            continue
        tick = time.perf_counter()
        activations = {"method": "act", "runner": GraphRunner.for_spec(spec, model)} if found_by == "act" else {}
        alignment = autoperm.align(spec, sd_a, sd_b, symmetries=symmetries, seed=seed, model=model, data=train_data,
                                   steps=family.refine_steps if learn else 0, lr=REFINE_LR, loss_fn=loss_fn,
                                   learn_permutations=learn == "every",
                                   batch_size=512 if found_by == "act" else REFINE_BATCH, **activations)
        timings[method] = time.perf_counter() - tick
        timings[f"{method} sweeps"] = alignment.sweeps
        aligned[method] = alignment.state_dict

    curves: dict[str, InterpolationCurve] = {}
    rows: dict[str, Any] = {}
    with tqdm(total=2 * len(aligned) * points, desc=f"{family.name}: barriers", file=sys.stderr, leave=False) as bar:
        for method, sd in aligned.items():
            for repaired in (False, True):
                key = f"{method}+repair" if repaired else method
                tick = time.perf_counter()
                curves[key] = context.curve(sd_a, sd, repaired, bar)
                rows[key] = {"barrier": _barriers(curves[key]), "seconds": time.perf_counter() - tick}
    # variance collapse at the midpoint (plain interpolation), per REPAIR site; BatchNorm
    # networks are left out (their interpolated running statistics are reset before evaluating)
    for method in [m for m in ("wm", "ste") if m in aligned] if not context.bn else ():
        repairer = Repairer(spec, model, sd_a, aligned[method], train_data, batch_size=512)
        rows[method]["variance_ratio"] = repairer.variance_ratio(0.5)
    for method, sd in aligned.items():
        distance = autoperm.l2_distance(sd_a, sd)
        rows[method]["l2"] = distance.absolute
        rows[method]["l2_relative"] = distance.relative
        for gamma in (0.0, 0.3):
            analysis = autoperm.singular_analysis(spec, sd_a, sd, gamma=gamma)
            rows[method][f"R_gamma{gamma}"] = analysis.alignment  # the pooled R of Ito et al.
            rows[method][f"R_layers_gamma{gamma}"] = {layer.name: layer.alignment for layer in analysis.layers}

    # anchor scheme: B and C each aligned to A, barrier between the aligned B and C
    anchor: dict[str, Any] = {}
    with tqdm(total=4 * points, desc=f"{family.name}: anchor scheme", file=sys.stderr, leave=False) as bar:
        for method in ("wm", "ste") if "wm" in aligned and "ste" in aligned else ():
            if method == "wm":
                perms_c = autoperm.weight_matching(spec, sd_a, sd_c, seed=seed).perms
            else:
                perms_c = autoperm.ste_matching(spec, model, sd_a, sd_c, train_data, loss_fn=loss_fn, epochs=family.ste_epochs,
                                                batch_size=128, seed=seed).perms
            sd_c_aligned = autoperm.apply_permutation(spec, perms_c, sd_c)
            for repaired in (False, True):
                key = f"{method}+repair" if repaired else method
                anchor[key] = _barriers(context.curve(aligned[method], sd_c_aligned, repaired, bar))

    trend: dict[str, Any] = {}
    for width in widths:
        if width == family.width and "wm" in rows:  # the same seeds train the same pair: reuse it
            trend[str(width)] = {key: rows[key]["barrier"]["test_loss"] for key in ("naive", "wm", "wm+repair")}
        else:
            trend[str(width)] = width_point(family, width, splits, eval_splits, example, points, seed)

    return {
        "family": family.name, "width": family.width, "parameters": sum(p.numel() for p in model.parameters()),
        "groups": len(spec.active_groups), "endpoints": endpoints, "methods": rows, "anchor": anchor,
        "solver_seconds": timings, "width_trend": trend, "seconds": time.perf_counter() - started,
        "curves": {key: curve.to_dict() for key, curve in curves.items()},
    }


def three_models(family: Family, seed: int, ste_steps: int, points: int) -> dict[str, Any]:
    """Ito et al.'s three-model comparison for one triple A, B, C trained from ``seed`` .. ``seed + 2``.

    B and C are each aligned to anchor A by WM and by STE (``ste_steps`` Adam steps, lr 1e-3,
    batch 256, final projection, started from WM's answer, as STE-MM runs it); reports the test
    loss barrier between the aligned B and C for each, R(A, pi(B)) at gamma 0.3, and MergeMany's
    merged model against the naive average and the individual models (BatchNorm statistics
    recomputed on the training split for every evaluated model that has them).
    """
    started = time.perf_counter()
    model, (sd_a, sd_b, sd_c), spec, context, _, _ = _trained_triple(family, seed, points, f"training triple {seed}")
    splits = context.splits
    train_data = splits["train"]

    def metrics(state_dict: StateDict) -> dict[str, float]:
        loaded = _loaded(model, state_dict)
        if context.bn:
            autoperm.reset_bn_stats(loaded, train_data)
        return context.evaluate(loaded.eval())

    aligned: dict[str, dict[str, StateDict]] = {"naive": {"B": sd_b, "C": sd_c}, "wm": {}, "ste": {}}
    ste_seconds = 0.0
    for name, other in (("B", sd_b), ("C", sd_c)):
        wm = autoperm.weight_matching(spec, sd_a, other, seed=seed)
        ste = autoperm.ste_matching(spec, model, sd_a, other, train_data, loss_fn=sequence_loss, steps=ste_steps, lr=1e-3,
                                    batch_size=256, optimizer="adam", select="final", init_perms=wm.perms, seed=seed)
        ste_seconds += ste.seconds
        aligned["wm"][name] = autoperm.apply_permutation(spec, wm.perms, other)
        aligned["ste"][name] = autoperm.apply_permutation(spec, ste.perms, other)
    row: dict[str, Any] = {"seeds": [seed, seed + 1, seed + 2]}
    with tqdm(total=3 * points, desc=f"{family.name}: anchor scheme", file=sys.stderr, leave=False) as bar:
        for method, pair in aligned.items():
            row[f"anchor_barrier {method}"] = _barriers(context.curve(pair["B"], pair["C"], False, bar))["test_loss"]
    for method in ("wm", "ste"):
        row[f"R_gamma0.3 {method}"] = autoperm.singular_analysis(None, sd_a, aligned[method]["B"], gamma=0.3).alignment
    merged = autoperm.merge_many(spec, [sd_a, sd_b, sd_c], method="wm", seed=seed)
    individual = [metrics(sd) for sd in (sd_a, sd_b, sd_c)]
    for label, values in (("merged", metrics(merged.state_dict)),
                          ("naive_average", metrics(mean_state_dict([sd_a, sd_b, sd_c])))):
        row[f"{label} test_loss"], row[f"{label} test_accuracy"] = values["test_loss"], values["test_accuracy"]
    row["individual test_loss"] = sum(v["test_loss"] for v in individual) / 3
    row["individual test_accuracy"] = sum(v["test_accuracy"] for v in individual) / 3
    row["ste_steps"], row["ste_seconds"], row["seconds"] = ste_steps, ste_seconds, time.perf_counter() - started
    return row


def three_model_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and std (sample; 0 for one triple) of every number of :func:`three_models` over triples."""
    keys = [key for key, value in rows[0].items() if isinstance(value, float)]
    summary: dict[str, Any] = {"triples": list(rows)}
    for key in keys:
        values = [row[key] for row in rows]
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        summary[key] = {"mean": mean, "std": std}
    return summary


def _family_data(family: Family) -> tuple[dict[str, Any], dict[str, Any], torch.Tensor]:
    """The family's splits, the splits it is evaluated on, and an example input for tracing."""
    if family.data == "text":
        splits = stdlib_text(context=64, train_windows=256, test_windows=128)
        return splits, {"train": splits["train"], "test": splits["test"]}, splits["train"][0][:1]
    splits = digits(flat=family.data == "flat")
    return splits, splits, splits["train"][0][:1]


def width_point(family: Family, width: int, splits: Mapping[str, Any], eval_splits: Mapping[str, Split], example: torch.Tensor,
                points: int, seed: int) -> dict[str, float]:
    """Naive, WM and WM + REPAIR test-loss barriers of two models of one width."""
    fam = replace(family, width=width)
    with tqdm(total=(fam.steps or fam.epochs) * 2, desc=f"{family.name}: width {width}", file=sys.stderr, leave=False) as bar:
        models = [train(fam, fam.build(width, s), splits, s, bar) for s in (seed, seed + 1)]
    sd_a, sd_b = (_snapshot(m) for m in models)
    spec = autoperm.infer_spec(models[0], example)
    bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models[0].modules())
    context = Context(fam, models[0], spec, dict(splits), points, evaluator(eval_splits), bn)
    sd_wm = autoperm.apply_permutation(spec, autoperm.weight_matching(spec, sd_a, sd_b, seed=seed).perms, sd_b)
    with tqdm(total=3 * points, desc=f"{family.name}: width {width} barriers", file=sys.stderr, leave=False) as bar:
        return {
            "naive": _barriers(context.curve(sd_a, sd_b, False, bar))["test_loss"],
            "wm": _barriers(context.curve(sd_a, sd_wm, False, bar))["test_loss"],
            "wm+repair": _barriers(context.curve(sd_a, sd_wm, True, bar))["test_loss"],
        }


def _snapshot(model: nn.Module) -> StateDict:
    """A copy of the model's state: ``state_dict()`` shares its tensors with the parameters, so
    loading another state into the model (evaluating an endpoint) would change it too."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _loaded(model: nn.Module, state_dict: StateDict) -> nn.Module:
    model.load_state_dict(state_dict)
    return model.eval()


# ---------------------------------------------------------------------------- report
def format_tables(report: Mapping[str, Any]) -> str:
    """The printed summary: one row per family and method."""
    lines = ["| family | method | test loss barrier | + REPAIR | train loss barrier | + REPAIR | test acc barrier | + REPAIR | L2 | R (g=0) | R (g=0.3) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, part in report["families"].items():
        for method in METHODS:
            if method not in part["methods"]:
                continue
            row, fixed = part["methods"][method], part["methods"][f"{method}+repair"]
            lines.append(
                f"| {name} | {method} | {row['barrier']['test_loss']:.3f} | {fixed['barrier']['test_loss']:.3f} "
                f"| {row['barrier']['train_loss']:.3f} | {fixed['barrier']['train_loss']:.3f} "
                f"| {row['barrier']['test_accuracy']:.3f} | {fixed['barrier']['test_accuracy']:.3f} "
                f"| {row['l2']:.1f} | {row['R_gamma0.0']:.3f} | {row['R_gamma0.3']:.3f} |"
            )
    anchored = {name: part for name, part in report["families"].items() if part["anchor"]}
    if anchored:
        lines += ["", "anchor scheme (B, C aligned to A; barrier between them, test loss):", "",
                  "| family | WM | WM + REPAIR | STE | STE + REPAIR |", "|---|---:|---:|---:|---:|"]
    for name, part in anchored.items():
        a = part["anchor"]
        lines.append(f"| {name} | {a['wm']['test_loss']:.3f} | {a['wm+repair']['test_loss']:.3f} | {a['ste']['test_loss']:.3f} | {a['ste+repair']['test_loss']:.3f} |")
    trends = [(name, part["width_trend"]) for name, part in report["families"].items() if part["width_trend"]]
    for name, trend in trends:
        lines += ["", f"width trend ({name}, test loss barrier):", "", "| width | naive | WM | WM + REPAIR |", "|---:|---:|---:|---:|"]
        for width, values in trend.items():
            lines.append(f"| {width} | {values['naive']:.3f} | {values['wm']:.3f} | {values['wm+repair']:.3f} |")
    if report.get("three_models"):
        lines += ["", "three models (Ito et al.): B, C aligned to anchor A; mean +- std over triples, test set:", "",
                  "| family | recipe | triples | STE steps | B-C barrier naive | WM | STE | R(A,pi(B)) g=0.3 WM | STE "
                  "| MergeMany acc | naive avg acc | models' acc |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, part in report["three_models"].items():
            def cell(key: str, scale: float = 1.0) -> str:
                return f"{scale * part[key]['mean']:.3f} +- {scale * part[key]['std']:.3f}"
            lines.append(
                f"| {name} | {part['recipe']} | {len(part['triples'])} | {part['triples'][0]['ste_steps']} "
                f"| {cell('anchor_barrier naive')} | {cell('anchor_barrier wm')} | {cell('anchor_barrier ste')} "
                f"| {cell('R_gamma0.3 wm')} | {cell('R_gamma0.3 ste')} | {cell('merged test_accuracy')} "
                f"| {cell('naive_average test_accuracy')} | {cell('individual test_accuracy')} |"
            )
    lines += ["", "endpoint test loss / accuracy (A, B, C) and run time:", ""]
    for name, part in report["families"].items():
        ends = ", ".join(f"{e['test_loss']:.3f}/{e['test_accuracy']:.3f}" for e in part["endpoints"].values())
        lines.append(f"- {name} (width {part['width']}, {part['parameters']} parameters, {part['groups']} groups): {ends}; {part['seconds']:.0f} s")
    return "\n".join(lines)


def write_plots(report: Mapping[str, Any], out: Path) -> list[Path]:
    from autoperm.evaluate.plots import plot_interpolation

    written = []
    for name, part in report["families"].items():
        curves = {key: InterpolationCurve.from_dict(curve) for key, curve in part["curves"].items()}
        written.append(plot_interpolation(curves, out / f"{name}_barrier.png", f"{name}: interpolation A -> B"))
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(8, 3.5))
        for method in [m for m in ("naive", "wm", "am", "ste") if m in part["methods"]]:
            layers = part["methods"][method]["R_layers_gamma0.3"]
            axis.plot(range(len(layers)), list(layers.values()), marker="o", label=method)
        axis.set_xticks(range(len(layers)), list(layers), rotation=60, ha="right", fontsize=6)
        axis.set_ylabel("R_l (gamma = 0.3)")
        axis.set_title(f"{name}: singular-vector alignment per layer")
        axis.legend(fontsize=8)
        figure.tight_layout()
        path = out / f"{name}_R_layers.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def run(families: Sequence[str], out: str | Path, quick_run: bool = False, points: int = 13,
        widths: Sequence[int] = (), trend_family: str = "mlp", seed: int = 0, recipe: str = "own",
        triples: int = 0, ste_steps: int = 2300, epochs: int | None = None,
        rows: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the report (also written to ``out/report.json``).

    ``rows`` limits the methods computed (naive always; the anchor scheme needs ``wm`` and ``ste``,
    the width trend ``wm``).
    ``recipe`` is ``"own"`` or ``"authors"`` (:func:`authors_recipe`); ``triples`` > 0 adds the
    three-model comparison over that many triples (seeds ``seed + 3k`` .. ``seed + 3k + 2``) with
    STE at ``ste_steps``; ``epochs`` overrides every classifier family's epochs (a shorter run of
    a recipe, reported as such).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict[str, Any] = {"points": points, "quick": quick_run, "torch": torch.__version__,
                              "threads": torch.get_num_threads(), "recipe": recipe, "epochs_override": epochs,
                              "families": {}, "three_models": {}}
    for name in families:
        family = authors_recipe(FAMILIES[name]) if recipe == "authors" else FAMILIES[name]
        if epochs is not None and family.data != "text":
            family = replace(family, epochs=epochs, warmup_epochs=min(family.warmup_epochs, max(1, epochs // 20)))
        if quick_run:
            family = quick(family)
        trend = widths if name == trend_family else ()
        report["families"][name] = run_family(family, points, trend, seed, rows)
        logger.info("%s done in %.0f s", name, report["families"][name]["seconds"])
        if triples:
            rows = [three_models(family, seed + 3 * k, ste_steps, points) for k in range(triples)]
            report["three_models"][name] = {"recipe": family.recipe, "epochs": family.epochs,
                                            **three_model_summary(rows)}
        write_text_atomic(out / "report.json", json.dumps(report, indent=1))  # kept after every family
    report["seconds"] = time.perf_counter() - started
    write_text_atomic(out / "report.json", json.dumps(report, indent=1))
    write_plots(report, out)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--out", default="lmc-families", help="folder for report.json and the plots")
    parser.add_argument("--quick", action="store_true", help="narrow models, few epochs (seconds per family)")
    parser.add_argument("--points", type=int, default=13, help="points along each path")
    parser.add_argument("--widths", type=int, nargs="*", default=[64, 128, 256], help="widths of the trend family")
    parser.add_argument("--trend-family", default="mlp", choices=list(FAMILIES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", choices=("own", "authors"), default="own",
                        help="training recipes: each family's own, or Ito et al.'s (MLP, VGG, ResNet; see the module doc)")
    parser.add_argument("--epochs", type=int, help="override every classifier family's epochs (shorter runs of a recipe)")
    parser.add_argument("--three-models", action="store_true", help="add Ito et al.'s three-model comparison")
    parser.add_argument("--triples", type=int, default=3, help="independent triples of models for --three-models")
    parser.add_argument("--ste-steps", type=int, default=2300, help="STE steps of --three-models (STE-MM: 2,300)")
    parser.add_argument("--rows", nargs="+", choices=METHODS[1:],
                        help="compute only these methods (naive always; the anchor scheme needs wm and ste)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    report = run(args.families, args.out, args.quick, args.points, args.widths, args.trend_family, args.seed,
                 args.recipe, args.triples if args.three_models else 0, args.ste_steps, args.epochs, args.rows)
    print(format_tables(report))
    print(f"\ntotal {report['seconds']:.0f} s ({report['threads']} threads); wrote {Path(args.out) / 'report.json'}")


if __name__ == "__main__":
    main()
