"""The reference architectures whose specs ship in ``specs/``, and how to regenerate them.

Run ``python -m autoperm.reference [SPECS_DIR]`` to rewrite every spec whose model can
be built here (torchvision / transformers entries need those packages).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ReferenceModel", "REFERENCE_MODELS", "build_reference_spec", "available"]


@dataclass(frozen=True)
class ReferenceModel:
    """One bundled spec: the model path and arguments it is generated from."""

    file: str
    model: str
    input_shape: tuple[int, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    requires: str | None = None


REFERENCE_MODELS: tuple[ReferenceModel, ...] = (
    ReferenceModel("mlp.yaml", "autoperm.models:MLP", (1, 784)),
    ReferenceModel("vgg11.yaml", "autoperm.models:vgg11", (1, 3, 32, 32)),
    ReferenceModel("resnet20.yaml", "autoperm.models:resnet20", (1, 3, 32, 32)),
    ReferenceModel("resnet20_x4.yaml", "autoperm.models:resnet20", (1, 3, 32, 32), {"width": 4}),
    ReferenceModel("torchvision_resnet18.yaml", "torchvision.models:resnet18", (1, 3, 64, 64), {"num_classes": 10}, requires="torchvision"),
    ReferenceModel("torchvision_resnet50.yaml", "torchvision.models:resnet50", (1, 3, 64, 64), {"num_classes": 10}, requires="torchvision"),
    ReferenceModel("torchvision_densenet121.yaml", "torchvision.models:densenet121", (1, 3, 64, 64), {"num_classes": 10}, requires="torchvision"),
    ReferenceModel("torchvision_mobilenet_v2.yaml", "torchvision.models:mobilenet_v2", (1, 3, 64, 64), {"num_classes": 10}, requires="torchvision"),
    ReferenceModel("torchvision_vgg11.yaml", "torchvision.models:vgg11", (1, 3, 224, 224), {"num_classes": 10}, requires="torchvision"),
    ReferenceModel("torchvision_vit_b_16.yaml", "torchvision.models:vit_b_16", (1, 3, 224, 224), {"num_classes": 10}, requires="torchvision"),
    ReferenceModel("gpt2_tiny.yaml", "transformers:GPT2LMHeadModel", (1, 16),
                   {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 64, "use_cache": False},
                   dtype="long", requires="transformers"),
    ReferenceModel("llama_tiny.yaml", "transformers:LlamaForCausalLM", (1, 16),
                   {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64, "use_cache": False},
                   dtype="long", requires="transformers"),
)


def available(reference: ReferenceModel) -> bool:
    """Whether the package the model needs is installed."""
    return reference.requires is None or importlib.util.find_spec(reference.requires) is not None


def build_reference_spec(reference: ReferenceModel):
    """Infer the spec of a reference model exactly as ``autoperm spec`` would."""
    import warnings

    from autoperm.cli.common import load_model, make_inputs
    from autoperm.infer import UnsupportedOpWarning, infer_spec

    model = load_model(reference.model, reference.kwargs)
    inputs = make_inputs(model, [reference.input_shape], reference.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsupportedOpWarning)
        return infer_spec(model, inputs, model_name=reference.model)


def main(argv: list[str]) -> None:
    folder = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "specs"
    for reference in REFERENCE_MODELS:
        if not available(reference):
            continue
        build_reference_spec(reference).to_yaml(folder / reference.file)


if __name__ == "__main__":
    main(sys.argv[1:])
