"""Which Hugging Face and diffusers architectures work from a model directory, default config.

For each architecture: build it from its library's default config (``use_cache`` left on),
shrunk to a few layers, save it with ``save_pretrained`` (sharded), then through the directory
path autoperm's CLI takes: build from ``config.json`` on the meta device with default example
inputs, infer the spec, verify it on the real weights (largest relative output difference under
a random permutation), write a planted permutation as a directory in the same layout, and check
that weight matching recovers it exactly. Prints one row per architecture.

    python benchmarks/pretrained_report.py [--only llama,mixtral] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=128)
TRANSFORMERS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", DECODER),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", DECODER),
    "mistral": ("MistralForCausalLM", "MistralConfig", DECODER),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {**DECODER, "head_dim": 16}),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", {**DECODER, "pad_token_id": 0}),
    "mixtral": ("MixtralForCausalLM", "MixtralConfig", {**DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig", {
        **DECODER, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64}),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128)),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", {**DECODER}),
    "opt": ("OPTForCausalLM", "OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                               vocab_size=128, word_embed_proj_dim=64)),
    "bert": ("BertForMaskedLM", "BertConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, vocab_size=128)),
    "vit": ("ViTForImageClassification", "ViTConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                           num_attention_heads=4, image_size=32, patch_size=8)),
}
DIFFUSERS = {
    "unet": ("UNet2DConditionModel", dict(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, layers_per_block=1, sample_size=16,
        attention_head_dim=8, norm_num_groups=8)),
    "vae": ("AutoencoderKL", dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                                  sample_size=32)),
}


def build(name: str) -> torch.nn.Module:
    if name in TRANSFORMERS:
        import transformers

        model_class, config_class, kwargs = TRANSFORMERS[name]
        config = getattr(transformers, config_class)(**kwargs)
        return getattr(transformers, model_class)(config)
    import diffusers

    model_class, kwargs = DIFFUSERS[name]
    return getattr(diffusers, model_class)(**kwargs)


def report(name: str, workdir: Path) -> str:
    import autoperm
    from autoperm.pretrained import (
        build_from_directory, default_inputs, load_directory_weights, load_pretrained, read_model_directory,
        save_directory_weights, tied_names,
    )

    torch.manual_seed(0)
    model = build(name)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    path_a = workdir / name / "a"
    model.save_pretrained(path_a, max_shard_size="100KB")
    started = time.perf_counter()
    directory = read_model_directory(path_a)
    meta = build_from_directory(directory)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = autoperm.infer_spec(meta, default_inputs(meta, directory, device="meta"))
    inferred = time.perf_counter() - started
    unknown = [str(w.message).split(": ", 1)[-1] for w in caught if isinstance(w.message, autoperm.UnsupportedOpWarning)]
    real = load_pretrained(directory)
    precision = "float64"
    try:
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in default_inputs(real, directory).items()}
        verified = autoperm.verify_spec(real.double(), spec, inputs, seed=0)
    except RuntimeError:  # some kernels (grouped matmuls of fused experts) have no float64 version
        precision = "float32"
        real = real.float()
        verified = autoperm.verify_spec(real, spec, default_inputs(real, directory), seed=0)
    kinds = kinds_check(real, spec, inputs if precision == "float64" else default_inputs(real, directory))
    tied = tied_names(meta)
    # under the model's names whatever the directory stores (renamed or stacked expert tensors)
    sd_a, names = load_directory_weights(path_a, meta, tied=tied)
    path_b = workdir / name / "b"
    planted = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=2), sd_a)
    save_directory_weights(planted, names, path_b)
    del planted
    sd_b, _ = load_directory_weights(path_b, meta, tied=tied)
    started = time.perf_counter()
    result = autoperm.weight_matching(spec, sd_a, sd_b)
    matched = time.perf_counter() - started
    aligned = autoperm.apply_permutation(spec, result.perms, sd_b)
    recovered = "yes" if all(torch.equal(aligned[k], sd_a[k]) for k in sd_a) else "NO"
    if names.conversions or names.renamed:
        recovered += " (stored names differ from the model's)"
    heads = sum(1 for g in spec.active_groups if any(h.per == g.name for h in spec.active_groups))
    return (f"| {directory.name} | {spec.tracer} | {len(spec.active_groups)} ({heads} head groups) | "
            f"{verified.max_rel_diff:.1e} {'ok' if verified.passed else 'FAIL'} ({precision}) | {kinds} | {recovered} | "
            f"{inferred:.1f} s | {matched:.2f} s | {'; '.join(unknown) or '-'} |")


def kinds_check(model: torch.nn.Module, spec, inputs) -> str:
    """Every group's kind (random orthogonal, invertible, scale elements, seeds 0-2), as inferred and
    on the canonical form (norm gains folded; the streams folding enlarges get their larger kind):
    the largest relative output change and the groups beyond permutations, or ``-`` when none.
    Runs on a copy whose vectors (norm gains, biases) are perturbed by 0.3 N(0, 1)."""
    import copy

    import autoperm

    def worst(candidate: torch.nn.Module, candidate_spec) -> str:
        larger = sum(g.kind != "permutation" for g in candidate_spec.active_groups)
        if not larger:
            return "-"
        reports = [autoperm.verify_spec(candidate, candidate_spec, inputs, seed=seed, precision=precision) for seed in range(3)]
        passed = all(r.passed for r in reports)
        return f"{max(r.max_rel_diff for r in reports):.1e} {'ok' if passed else 'FAIL'} ({larger} groups)"

    model = copy.deepcopy(model)  # gains 1 and biases 0 at initialisation would make folding trivial: perturb them
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point() and tensor.ndim == 1:
                tensor.add_(0.3 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
    precision = "float64" if next(model.parameters()).dtype == torch.float64 else "float32"
    inferred = worst(model, spec)
    if not spec.norm_folds:
        return f"{inferred} / no folds"
    canonical_spec, canonical_state = autoperm.canonicalize(spec, model.state_dict())
    canonical = copy.deepcopy(model)
    canonical.load_state_dict(canonical_state)
    with torch.no_grad():  # the fold itself keeps the function
        reference, folded = (_first_tensor(m.eval()(**inputs)) for m in (model, canonical))
    same = float((folded - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
    return f"{inferred} / {worst(canonical, canonical_spec)} (fold alone {same:.1e})"


def _first_tensor(output) -> torch.Tensor:
    """The main tensor of a model's output (logits, sample, or the first entry)."""
    for name in ("logits", "sample", "last_hidden_state"):
        if getattr(output, name, None) is not None:
            return getattr(output, name)
    return output if isinstance(output, torch.Tensor) else output[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="Comma-separated names (default: all).")
    parser.add_argument("--workdir", type=Path, help="Where the directories go (default: a temporary one).")
    options = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    names = options.only.split(",") if options.only else [*TRANSFORMERS, *DIFFUSERS]
    print("| model | tracer | groups | verify (max rel diff) | kinds, 3 seeds: as inferred / canonical form | planted recovered "
          "| infer | match | kept fixed around |")
    print("|---|---|---|---|---|---|---:|---:|---|")
    with tempfile.TemporaryDirectory() as temporary:
        workdir = options.workdir or Path(temporary)
        for name in names:
            try:
                print(report(name, workdir), flush=True)
            except Exception as error:  # report and go on: this is a survey
                print(f"| {name} | error: {type(error).__name__}: {str(error).splitlines()[0][:200]} |", flush=True)


if __name__ == "__main__":
    main()
