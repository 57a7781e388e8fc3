"""`autoperm match A B --symmetries orthogonal|full` on Hugging Face directories.

The output directory loads with ``from_pretrained`` and computes B's function (compared in
float64), keeps A's norm gains (B is written in A's gauge), and on a planted permutation of A
gives back A.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

from autoperm import apply_permutation, random_permutation  # noqa: E402
from autoperm.cli import cli  # noqa: E402
from autoperm.spec import PermutationSpec  # noqa: E402
from tests.conftest import perturb_  # noqa: E402

BUILDERS = {
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96,
                                                                          n_positions=32)),
             transformers.GPT2LMHeadModel),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=96)), transformers.LlamaForCausalLM),
}


def _invoke(args: list[str]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CliRunner().invoke(cli, args, standalone_mode=False, catch_exceptions=True)


def _logits(loader, path: Path) -> torch.Tensor:
    model = loader.from_pretrained(path).double().eval()
    tokens = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_full_symmetries_keep_b_function_in_a_gauge(name: str, tmp_path: Path) -> None:
    transformers.logging.set_verbosity_error()
    build, loader = BUILDERS[name]
    for label, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        perturb_(build(), seed + 1, scale=0.05).save_pretrained(tmp_path / label)
    out = tmp_path / "out"
    result = _invoke(["match", str(tmp_path / "a"), str(tmp_path / "b"), "--symmetries", "full", "-o", str(out)])
    assert result.exception is None, result.output
    assert "A's gauge" in result.output
    assert torch.allclose(_logits(loader, out), _logits(loader, tmp_path / "b"), atol=1e-4)
    a = loader.from_pretrained(tmp_path / "a").state_dict()
    aligned = loader.from_pretrained(out).state_dict()
    # the blocks' norms fold, so B takes A's gains; GPT-2's final norm feeds the tied head and does not
    gains = [k for k in a if ("ln" in k or "norm" in k) and k.endswith("weight") and (".h." in k or ".layers." in k)]
    assert gains and all(torch.equal(aligned[k], a[k]) for k in gains)


def test_max_sweeps_bounds_generalised_matching(tmp_path: Path) -> None:
    transformers.logging.set_verbosity_error()
    build, loader = BUILDERS["llama"]
    for label, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        perturb_(build(), seed + 1, scale=0.05).save_pretrained(tmp_path / label)
    outputs = {}
    for sweeps in (1, 2):
        out = tmp_path / f"out{sweeps}"
        result = _invoke(["match", str(tmp_path / "a"), str(tmp_path / "b"), "--symmetries", "orthogonal",
                          "--max-sweeps", str(sweeps), "-o", str(out)])
        assert result.exception is None, result.output
        assert f"after {sweeps} sweep(s)" in result.output
        outputs[sweeps] = float(result.output.split(" -> ")[1].split()[0])
        assert torch.allclose(_logits(loader, out), _logits(loader, tmp_path / "b"), atol=1e-4)
    assert outputs[2] >= outputs[1]
    refused = _invoke(["match", str(tmp_path / "a"), str(tmp_path / "b"), "--symmetries", "orthogonal",
                       "--max-sweeps", "0", "-o", str(tmp_path / "never")])
    assert refused.exception is not None and "--max-sweeps" in refused.exception.format_message()
    assert not (tmp_path / "never").exists()


def test_planted_permutation_comes_back_exactly_with_orthogonal_symmetries(tmp_path: Path) -> None:
    transformers.logging.set_verbosity_error()
    build, loader = BUILDERS["gpt2"]
    torch.manual_seed(0)
    model = perturb_(build(), 1, scale=0.05).eval()
    model.save_pretrained(tmp_path / "a")
    spec_path = tmp_path / "spec.yaml"
    assert _invoke(["spec", str(tmp_path / "a"), "-o", str(spec_path)]).exception is None
    spec = PermutationSpec.from_yaml(spec_path)
    model.load_state_dict(apply_permutation(spec, random_permutation(spec, seed=5), model.state_dict()))
    model.save_pretrained(tmp_path / "b")
    out = tmp_path / "out"
    result = _invoke(["match", str(tmp_path / "a"), str(tmp_path / "b"), "--symmetries", "orthogonal", "-o", str(out)])
    assert result.exception is None, result.output
    a = loader.from_pretrained(tmp_path / "a").state_dict()
    aligned = loader.from_pretrained(out).state_dict()
    worst = max(float((aligned[k] - a[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < 1e-5


def test_symmetries_refuse_perms_out(tmp_path: Path) -> None:
    transformers.logging.set_verbosity_error()
    build, _ = BUILDERS["gpt2"]
    build().save_pretrained(tmp_path / "a")
    build().save_pretrained(tmp_path / "b")
    result = _invoke(["match", str(tmp_path / "a"), str(tmp_path / "b"), "--symmetries", "full", "-o",
                      str(tmp_path / "out"), "--perms-out", str(tmp_path / "p.yaml")])
    assert result.exception is not None
    assert "--symmetries full" in str(result.exception)
    assert not (tmp_path / "out").exists()


def test_vit_classifier_stream_admits_ones_fixing_orthogonal_maps_once_folded() -> None:
    """ViT's final LayerNorm is read as ``x[:, 0, :]`` by the classifier: still foldable."""
    transformers.logging.set_verbosity_error()
    import autoperm

    config = transformers.ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    model = perturb_(transformers.ViTForImageClassification(config), 1, scale=0.05).double().eval()
    images = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    spec = autoperm.infer_spec(model, (images,))
    assert len(spec.norm_folds) == 2 * 2 + 1
    canonical, state = autoperm.canonicalize(spec, model.state_dict())
    stream = canonical.active_groups[0]
    assert (stream.kind, stream.fixes_ones) == ("orthogonal", True)
    expected = model(pixel_values=images).logits
    model.load_state_dict(autoperm.apply_transform(canonical, autoperm.random_transform(canonical, seed=1), state))
    assert torch.allclose(model(pixel_values=images).logits, expected, atol=1e-10)


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits


def test_learned_refinement_runs_on_a_tied_model_and_keeps_b_function() -> None:
    """GPT-2 shares its embedding with its head: the refinement's functional calls must accept both names."""
    transformers.logging.set_verbosity_error()
    import autoperm

    build, _ = BUILDERS["gpt2"]
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(_Logits(perturb_(build(), seed + 1, scale=0.05)).double().eval())
    tokens = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(2))
    spec = autoperm.infer_spec(models[0], (tokens[:1],))
    a, b = (m.state_dict() for m in models)
    expected = models[1](tokens)
    result = autoperm.align(spec, a, b, symmetries="orthogonal", model=models[0], data=(tokens[:, :-1], tokens[:, 1:]),
                            steps=3, batch_size=4)
    assert len(result.losses) == 3 and all(math.isfinite(loss) for loss in result.losses)
    models[1].load_state_dict(result.state_dict)
    assert torch.allclose(models[1](tokens), expected, atol=1e-8)
