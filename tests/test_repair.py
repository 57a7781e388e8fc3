"""REPAIR (Jordan et al., arXiv 2211.08403) on any spec: sites, exact renormalisation, folding.

Properties checked:

* with all the data in one batch, the repaired network's statistics at every site are exactly
  the goal ``((1-t) mu_A + t mu_B, (1-t) s_A + t s_B)`` (the correction upstream included), in
  float64, for linear, conv + BatchNorm and LayerNorm / attention networks;
* at ``t = 0`` REPAIR leaves model A as it is;
* the result is a plain state dict of the architecture (same names, shapes, dtypes; loads
  strictly), and no input is modified;
* it works through torch.fx (torchvision ResNet-18) and torch.export (Hugging Face GPT-2, whose
  projections are ``addmm``), giving finite outputs and a measured barrier with REPAIR.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import autoperm
from autoperm.models import MLP
from autoperm.errors import AutopermError, DataError, SpecError
from autoperm.evaluate.repair import Repairer, repair, repair_sites
from autoperm.infer.registry import has_module_rule
from autoperm.trace import stream_activations
from tests.conftest import optional_import, perturb_


class ConvBN(nn.Module):
    def __init__(self, width: int = 6):
        super().__init__()
        self.conv1 = nn.Conv2d(2, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)) + out)
        return self.head(out.mean((2, 3)))


class TinyTransformer(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(3, dim)
        self.ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 2 * dim, bias=False)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        h = self.embed(x)
        q, k, v = self.qkv(self.ln(h)).view(batch, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, -1))
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h.mean(1))


def _pair(model: nn.Module, example: torch.Tensor, seed: int = 0):
    """Two float64 models whose B is a permuted, perturbed copy of A, aligned back by weight matching."""
    model = perturb_(model.double().eval(), seed=seed, scale=0.2)
    spec = autoperm.infer_spec(model, example)
    sd_a = {k: v.clone() for k, v in model.state_dict().items()}
    noisy = perturb_(copy.deepcopy(model), seed=seed + 1, scale=0.3).state_dict()
    sd_b = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=seed), noisy)
    result = autoperm.weight_matching(spec, sd_a, sd_b, seed=0)
    return model, spec, sd_a, autoperm.apply_permutation(spec, result.perms, sd_b)


CASES = {
    "mlp": (lambda: MLP(in_features=5, hidden=7, depth=3), lambda g: torch.randn(64, 5, generator=g)),
    "conv_bn": (lambda: ConvBN(), lambda g: torch.randn(16, 2, 5, 5, generator=g)),
    "transformer": (lambda: TinyTransformer(), lambda g: torch.randn(16, 4, 3, generator=g)),
}


def _site_moments(model, spec, sites, state_dict, x):
    values = next(stream_activations(model, [s.node for s in sites], [x], tracer=spec.tracer, state_dict=state_dict,
                                     is_leaf=has_module_rule))
    moments = {}
    for site in sites:
        rows = values[site.node].movedim(site.channel_axis, -1)[..., list(site.channels)].reshape(-1, len(site.channels))
        moments[site.node] = (rows.mean(0), rows.std(0, unbiased=False), rows.pow(2).mean(0).sqrt())
    return moments


@pytest.mark.parametrize("case", sorted(CASES))
def test_repaired_statistics_equal_the_goal(case):
    build, make = CASES[case]
    x = make(torch.Generator().manual_seed(0)).double()
    model, spec, sd_a, sd_b = _pair(build(), x[:1])
    inputs_before = {k: v.clone() for k, v in sd_b.items()}
    repairer = Repairer(spec, model, sd_a, sd_b, (x, torch.zeros(len(x))), batch_size=len(x), eps=1e-12)
    assert repairer.sites, "every case has permuted channels to correct"
    result = repairer.repair(0.5)
    goals = repairer.goal(0.5)
    measured = _site_moments(model, spec, repairer.sites, result.state_dict, x)
    for site in repairer.sites:
        mean, std, rms = measured[site.node]
        goal = goals[site.node]
        if site.bias is None:
            torch.testing.assert_close(rms, goal.rms, rtol=1e-6, atol=1e-9)
        else:
            torch.testing.assert_close(mean, goal.mean, rtol=1e-6, atol=1e-8)
            torch.testing.assert_close(std, goal.std, rtol=1e-6, atol=1e-8)
    # a plain state dict of the same architecture; inputs untouched
    assert {k: (v.shape, v.dtype) for k, v in result.state_dict.items()} == {k: (v.shape, v.dtype) for k, v in sd_a.items()}
    copy.deepcopy(model).load_state_dict(result.state_dict, strict=True)
    assert all(torch.equal(sd_b[k], inputs_before[k]) for k in sd_b)


def test_sites_cover_every_permuted_producer_and_leave_the_conv_to_its_batchnorm():
    model = ConvBN()
    spec = autoperm.infer_spec(model, torch.randn(1, 2, 5, 5))
    sites = {site.node: site for site in repair_sites(spec, model, torch.randn(1, 2, 5, 5))}
    assert set(sites) == {"bn1", "bn2"}  # conv1 / conv2 feed only their BatchNorm; the head's outputs are fixed
    assert sites["bn1"].weight == "bn1.weight" and sites["bn1"].bias == "bn1.bias"
    transformer = TinyTransformer()
    example = torch.randn(1, 4, 3)
    spec = autoperm.infer_spec(transformer, example)
    sites = {site.node: site for site in repair_sites(spec, transformer, example)}
    assert {"embed", "ln", "qkv", "proj", "fc1", "fc2"} <= set(sites)
    assert "head" not in sites
    assert sites["fc1"].bias is None  # bias=False: scale-only correction
    assert len(sites["qkv"].channels) == 24  # queries, keys and values all move with the heads


def test_repair_at_t0_keeps_model_a():
    build, make = CASES["conv_bn"]
    x = make(torch.Generator().manual_seed(1)).double()
    model, spec, sd_a, sd_b = _pair(build(), x[:1], seed=3)
    result = repair(spec, model, sd_a, sd_b, (x, torch.zeros(len(x))), t=0.0, batch_size=len(x), eps=1e-12)
    for name, tensor in sd_a.items():
        torch.testing.assert_close(result.state_dict[name], tensor, rtol=1e-7, atol=1e-9)
    assert all(abs(ratio - 1.0) < 1e-6 for ratio in result.std_ratio.values())


def test_repair_in_interpolation_curve_and_errors():
    build, make = CASES["mlp"]
    x = make(torch.Generator().manual_seed(2)).double()
    y = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(2))
    model, spec, sd_a, sd_b = _pair(build(), x[:1])
    repairer = Repairer(spec, model, sd_a, sd_b, (x, y))
    curve = autoperm.interpolation_curve(model, sd_a, sd_b, {"train": (x, y)}, num_points=3, transform=repairer)
    assert all(torch.isfinite(torch.tensor(curve["train_loss"])))
    with pytest.raises(AutopermError, match="t must be in"):
        repairer.repair(1.5)
    with pytest.raises(DataError, match="no batches"):
        Repairer(spec, model, sd_a, sd_b, [])
    broken = {k: v for k, v in sd_b.items() if k != "head.bias"}
    with pytest.raises(SpecError, match="head.bias"):
        Repairer(spec, model, sd_a, broken, (x, y))


def test_repair_torchvision_resnet18():
    torchvision = optional_import("torchvision")
    torch.manual_seed(0)
    model = perturb_(torchvision.models.resnet18(num_classes=4).eval(), scale=0.05)
    x = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 4, (24,), generator=torch.Generator().manual_seed(0))
    spec = autoperm.infer_spec(model, x[:1])
    other = autoperm.reset_bn_stats(perturb_(copy.deepcopy(model), seed=5, scale=0.05), (x, y))
    sd_a = autoperm.reset_bn_stats(model, (x, y)).state_dict()  # real BatchNorm statistics at both ends
    sd_b = autoperm.apply_permutation(spec, autoperm.random_permutation(spec, seed=1), other.state_dict())
    sd_b = autoperm.apply_permutation(spec, autoperm.weight_matching(spec, sd_a, sd_b).perms, sd_b)
    repairer = Repairer(spec, model, sd_a, sd_b, (x, y), batch_size=12)
    assert len(repairer.sites) == 20  # every BatchNorm (downsample ones included); convs feed their norms
    result = repairer.repair(0.5)
    assert set(result.std_ratio) == {site.node for site in repairer.sites}
    assert all(0 < r < float("inf") for r in result.std_ratio.values())
    assert any(not torch.equal(result.state_dict[k], v) for k, v in autoperm.evaluate.interpolate_state_dicts(sd_a, sd_b, 0.5).items())
    curve = autoperm.interpolation_curve(model, sd_a, sd_b, {"train": (x, y)}, num_points=3, reset_bn=(x, y), transform=repairer)
    assert all(torch.isfinite(torch.tensor(curve["train_loss"])))
    assert autoperm.loss_barrier(curve, metric="train_loss") == autoperm.loss_barrier(curve, metric="train_loss")


@pytest.mark.filterwarnings("ignore::autoperm.UnsupportedOpWarning")
@pytest.mark.parametrize(("tracer", "norm_op"), [("export", "layer_norm"), ("auto", "LayerNorm")])
def test_repair_hugging_face_gpt2_on_shape_specialised_graphs(tracer: str, norm_op: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=40, n_positions=16, use_cache=False,
                                     bos_token_id=0, eos_token_id=0)

    class LM(nn.Module):  # logits only, so the traced graph has one tensor output
        def __init__(self):
            super().__init__()
            self.gpt = transformers.GPT2LMHeadModel(config)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.gpt(input_ids=tokens).logits

    torch.manual_seed(0)
    model = perturb_(LM().eval(), scale=0.05)
    tokens = torch.randint(0, 40, (16, 12), generator=torch.Generator().manual_seed(0))
    spec = autoperm.infer_spec(model, tokens[:1], tracer=tracer)
    assert spec.tracer == ("export" if tracer == "export" else "fx")  # torch.fx traces it with known shapes
    sd_a = model.state_dict()
    sd_b = perturb_(copy.deepcopy(model), seed=7, scale=0.05).state_dict()
    sd_b = autoperm.apply_permutation(spec, autoperm.weight_matching(spec, sd_a, sd_b).perms, sd_b)
    repairer = Repairer(spec, model, sd_a, sd_b, (tokens, tokens), batch_size=6)  # batches of 6, 6 and 4
    ops = {site.op for site in repairer.sites}
    assert {"addmm", norm_op} <= ops, ops
    result = repairer.repair(0.5)
    work = copy.deepcopy(model)
    work.load_state_dict(result.state_dict, strict=True)
    with torch.no_grad():
        assert torch.isfinite(work(tokens)).all()

    def evaluate(module: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            logits = module(tokens)
        return {"loss": float(F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()))}

    curve = autoperm.interpolation_curve(model, sd_a, sd_b, evaluate, num_points=3, transform=repairer)
    assert torch.isfinite(torch.tensor(autoperm.loss_barrier(curve)))


def test_cli_barrier_repair_writes_both_curves(tmp_path):
    from click.testing import CliRunner

    from autoperm.cli import cli

    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(MLP(64, hidden=16, depth=2).state_dict(), paths[name])
    common = ["barrier", "autoperm.models:MLP", "--kwargs", "in_features=64", "--kwargs", "hidden=16", "--kwargs", "depth=2",
              "--a", str(paths["a"]), "--b", str(paths["b"]), "--data", "digits", "--points", "3", "--repair"]
    report = tmp_path / "r.json"
    result = CliRunner().invoke(cli, [*common, "--json", str(report)])
    assert result.exit_code == 0, result.output
    assert "with REPAIR" in result.output and "REPAIR: 2 layer(s), 32 channels corrected" in result.output
    data = json.loads(report.read_text())
    assert set(data["repair"]["barriers"]) == set(data["barriers"])
    assert [site["weight"] for site in data["repair"]["sites"]] == ["layers.0.weight", "layers.1.weight"]
    assert all(math.isfinite(v) for v in data["repair"]["curve"]["test_loss"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: 3\n")
    result = CliRunner().invoke(cli, [*common, "--spec", str(bad)])
    assert result.exit_code != 0 and isinstance(result.exception, SpecError) and "bad.yaml" in str(result.exception)
