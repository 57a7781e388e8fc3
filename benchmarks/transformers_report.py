"""Per-model report on transformer definitions: groups found, verify differences, planted
recovery, and inference / weight-matching times.

Small configs built without downloading weights (Hugging Face ``transformers``) and, with
``--torchvision``, torchvision's ``vit_b_16``. Weights are perturbed first (zero-initialised
layers would make the checks trivial). Not part of the test suite.

Run: ``python benchmarks/transformers_report.py [--torchvision]``
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import autoperm


def perturb(model: nn.Module, scale: float = 0.02, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(scale * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def report(name: str, model: nn.Module, inputs: torch.Tensor) -> None:
    model = perturb(model)
    start = time.perf_counter()
    spec = autoperm.infer_spec(model, inputs)
    infer_seconds = time.perf_counter() - start
    verify = autoperm.verify_spec(model, spec, inputs)
    state = model.state_dict()
    permuted = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=3), state)
    start = time.perf_counter()
    result = autoperm.weight_matching(spec, state, permuted)
    match_seconds = time.perf_counter() - start
    recovered = autoperm.apply_permutation(spec, result.perms, permuted)
    exact = all(torch.equal(recovered[k], state[k]) for k in state)
    heads = {g.per for g in spec.active_groups if g.per}
    within = sum(1 for g in spec.active_groups if g.per)
    other = len(spec.active_groups) - len(heads) - within
    print(f"| {name} | {spec.tracer} | {len(heads)} / {within} / {other} | {verify.max_abs_diff:.1e} / "
          f"{verify.max_rel_diff:.1e} | {'exact' if exact else 'NOT exact'} | {infer_seconds:.2f} s | "
          f"{match_seconds:.2f} s ({result.n_iter} sweeps) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torchvision", action="store_true", help="also torchvision's vit_b_16")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=autoperm.UnsupportedOpWarning)
    print("| model | tracer | groups: heads / within-head / other | verify max abs / rel | planted recovery | infer | match |")
    print("|---|---|---|---|---|---|---|")
    import transformers as hf

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    tokens = torch.randint(0, 100, (2, 16))
    report("BertForSequenceClassification", hf.BertForSequenceClassification(
        hf.BertConfig(vocab_size=100, max_position_embeddings=64, **common)), tokens)
    report("GPT2LMHeadModel (tied embeddings)", hf.GPT2LMHeadModel(
        hf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64, use_cache=False)), tokens)
    report("LlamaForCausalLM (GQA 4/2, RoPE, SwiGLU)", hf.LlamaForCausalLM(hf.LlamaConfig(
        vocab_size=100, max_position_embeddings=64, num_key_value_heads=2, use_cache=False,
        tie_word_embeddings=False, **common)), tokens)
    report("ViTForImageClassification", hf.ViTForImageClassification(
        hf.ViTConfig(image_size=32, patch_size=8, num_labels=10, **common)), torch.randn(2, 3, 32, 32))
    if args.torchvision:
        import torchvision

        report("torchvision vit_b_16", torchvision.models.vit_b_16(num_classes=10), torch.randn(1, 3, 224, 224))


if __name__ == "__main__":
    main()
