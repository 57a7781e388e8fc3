"""Building a model from a Hugging Face or diffusers directory, and example inputs that fit it.

``config.json`` names the class: ``architectures`` for ``transformers`` (``save_pretrained`` of
a ``PreTrainedModel``), ``_class_name`` for ``diffusers`` (``save_pretrained`` of a
``ModelMixin``). Only classes the installed library provides are built; code shipped with a
checkpoint (``auto_map``) is never run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoperm.errors import CheckpointError, ModelLoadError
from autoperm.io import load_state_dict, read_json_object

__all__ = [
    "ModelDirectory",
    "read_model_directory",
    "is_model_directory",
    "build_from_directory",
    "load_pretrained",
    "default_inputs",
    "tied_names",
    "check_names",
]

logger = logging.getLogger(__name__)

SEQUENCE_LENGTH = 16


@dataclass(frozen=True)
class ModelDirectory:
    """A model directory and what its ``config.json`` says.

    Attributes:
        path: the directory.
        library: ``"transformers"`` or ``"diffusers"``.
        class_name: the model class in that library.
        config: the parsed ``config.json``.
    """

    path: Path
    library: str
    class_name: str
    config: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        """``library:Class``, as recorded in specs."""
        return f"{self.library}:{self.class_name}"


def is_model_directory(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory with a ``config.json``."""
    return (Path(path) / "config.json").is_file()


def read_model_directory(path: str | os.PathLike[str]) -> ModelDirectory:
    """Read ``config.json`` of a model directory and find the class it names.

    Raises:
        ModelLoadError: no directory or no ``config.json``, unreadable JSON, or a config that
            names neither a transformers architecture nor a diffusers class.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory {str(path)!r} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"model directory {str(path)!r} has no config.json; give a directory written by save_pretrained "
            "(transformers or diffusers), or MODEL as package.module:attr"
        )
    config = read_json_object(config_file, ModelLoadError)
    if isinstance(config.get("_class_name"), str):
        return ModelDirectory(path, "diffusers", config["_class_name"], config)
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        if len(architectures) > 1:
            raise ModelLoadError(f"{str(config_file)!r}: 'architectures' lists {architectures}; expected one class")
        return ModelDirectory(path, "transformers", architectures[0], config)
    raise ModelLoadError(
        f"{str(config_file)!r} has neither 'architectures' (transformers) nor '_class_name' (diffusers), "
        "so the model class is unknown; give MODEL as package.module:attr"
    )


def _model_class(directory: ModelDirectory) -> type[nn.Module]:
    try:
        library = __import__(directory.library)
    except ImportError:
        raise ModelLoadError(
            f"model directory {str(directory.path)!r} is a {directory.library} model ({directory.class_name}); "
            f"install it with: pip install {directory.library}"
        ) from None
    cls = getattr(library, directory.class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        field_name = "_class_name" if directory.library == "diffusers" else "architectures"
        custom = " (its config has auto_map: the class is custom code, which autoperm never runs)" if "auto_map" in directory.config else ""
        raise ModelLoadError(
            f"{str(directory.path / 'config.json')!r}: field {field_name!r} names {directory.class_name!r}, which "
            f"{directory.library} {getattr(library, '__version__', '')} does not provide{custom}; "
            f"upgrade {directory.library}, or give MODEL as package.module:attr"
        )
    return cls


def build_from_directory(directory: ModelDirectory, device: str | torch.device = "meta") -> nn.Module:
    """Build the model ``config.json`` describes, with freshly initialised weights on ``device``.

    On the ``meta`` device (the default) no memory is allocated for weights: enough to trace the
    model and infer its spec.

    Raises:
        ModelLoadError: the library or class is missing, or the config does not build.
    """
    cls = _model_class(directory)
    try:
        if directory.library == "transformers":
            config = cls.config_class.from_pretrained(str(directory.path))
            with torch.device(device):
                model = cls(config)
        else:
            config = cls.load_config(str(directory.path))
            with torch.device(device):
                model = cls.from_config(config)
    except Exception as error:  # a config the class rejects can raise anything
        raise ModelLoadError(
            f"cannot build {directory.name} from {str(directory.path / 'config.json')!r}: {type(error).__name__}: {error}"
        ) from error
    return model.float().eval() if str(device) != "meta" else model.eval()


def tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that share one tensor (tied embeddings and heads)."""
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        names = by_tensor.setdefault(id(tensor), [])
        if name not in names:
            names.append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def load_pretrained(directory: ModelDirectory, checkpoint: str | os.PathLike[str] | None = None) -> nn.Module:
    """Build the model on the CPU in float32 and load weights (``checkpoint``, default the directory's).

    Stored tensors that transformers renames or stacks when loading (GPT-NeoX's ``embed_out``,
    ViT, mixture-of-experts weights stored one tensor per expert) are converted the same way
    (:mod:`autoperm.pretrained.stored_names`); a directory whose tensors transformers converts
    otherwise (a fused ``qkv`` it splits) is loaded with the class's own ``from_pretrained``.

    Raises:
        ModelLoadError: see :func:`build_from_directory`.
        CheckpointError: the weights cannot be read or do not fit the model (names the keys).
    """
    from autoperm.pretrained.stored_names import load_directory_weights

    model = build_from_directory(directory, device="cpu")
    source = checkpoint if checkpoint is not None else directory.path
    if Path(source).is_dir():
        try:
            state_dict, _ = load_directory_weights(source, model, tied=tied_names(model))
        except CheckpointError as error:
            if checkpoint is not None or directory.library != "transformers":
                raise
            logger.info("%s; loading with from_pretrained", error)
            return _from_pretrained(directory, error)
    else:
        state_dict = load_state_dict(source, tied=tied_names(model))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        lines = " ".join(str(error).split())[:600]
        raise CheckpointError(f"the weights in {str(source)!r} do not fit {directory.name}: {lines}") from None
    return model


def _from_pretrained(directory: ModelDirectory, cause: CheckpointError) -> nn.Module:
    """The class's own ``from_pretrained``, for tensors transformers converts in ways autoperm does not run."""
    try:
        return _model_class(directory).from_pretrained(str(directory.path)).float().eval()
    except Exception as error:  # transformers can raise anything; the first error explains more
        logger.info("from_pretrained(%s) failed: %s", directory.path, error)
        raise cause from error


def check_names(state_dict: Mapping[str, torch.Tensor], model: nn.Module, where: str, model_name: str) -> None:
    """Raise unless the checkpoint's tensor names are exactly the model's state-dict names.

    Raises:
        CheckpointError: naming the first missing and unexpected names, and the two usual causes.
    """
    expected = model.state_dict().keys()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {where!r} does not hold the tensors of {model_name}: missing {missing[:3]} "
            f"({len(missing)} in all), unexpected {unexpected[:3]} ({len(unexpected)} in all): it is another "
            "architecture or another configuration of it (names are compared after transformers' own renaming)"
        )


def default_inputs(model: nn.Module, directory: ModelDirectory, device: str | torch.device = "cpu", seed: int = 0) -> dict[str, Any]:
    """Example keyword inputs that fit the model type.

    Token ids (1 x 16) for language models (plus decoder ids for encoder-decoders), pixel values
    at the configured image size for vision models, a latent sample with a timestep and encoder
    hidden states for a conditional UNet, a sample for autoencoders.

    Raises:
        ModelLoadError: no default is known for this model type (give ``--input-shape``).
    """
    generator = torch.Generator().manual_seed(seed)
    config = directory.config
    inputs: dict[str, Any]
    if directory.library == "transformers":
        inputs = _transformers_inputs(model, directory, generator)
    else:
        inputs = _diffusers_inputs(directory, config, generator)
    return {key: _to(value, device) for key, value in inputs.items()}


def _to(value: Any, device: str | torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value


def _sub(config: Any, key: str, *nested: str) -> Any:
    value = getattr(config, key, None)
    for name in nested:
        if value is not None:
            break
        value = getattr(getattr(config, name, None), key, None)
    return value


def _no_default(directory: ModelDirectory, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"no default example input for {directory.name} ({what}); give --input-shape (and --dtype long for token ids)"
    )


def _transformers_inputs(model: nn.Module, directory: ModelDirectory, generator: torch.Generator) -> dict[str, Any]:
    config = model.config
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        vocab = _sub(config, "vocab_size", "text_config", "decoder")
        if not isinstance(vocab, int):
            sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
            if not sizes:
                raise _no_default(directory, "no vocabulary size in its config")
            vocab = min(sizes)
        tokens = torch.randint(0, vocab, (1, SEQUENCE_LENGTH), generator=generator)
        inputs: dict[str, Any] = {"input_ids": tokens}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = tokens.clone()
        return inputs
    if name == "pixel_values":
        channels = _sub(config, "num_channels", "vision_config") or 3
        size = _sub(config, "image_size", "vision_config") or 224
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        return {"pixel_values": torch.randn((1, channels, height, width), generator=generator)}
    if name == "input_values":
        return {"input_values": torch.randn((1, 16000), generator=generator)}
    raise _no_default(directory, f"main input {name!r}")


def _diffusers_inputs(directory: ModelDirectory, config: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
    blocks = config.get("down_block_types") or config.get("block_out_channels") or ()
    size = max(8, 2 ** len(blocks))
    channels = config.get("in_channels")
    if not isinstance(channels, int):
        raise _no_default(directory, "no 'in_channels' in its config")
    sample = torch.randn((1, channels, size, size), generator=generator)
    if directory.class_name == "UNet2DConditionModel":
        inputs: dict[str, Any] = {
            "sample": sample,
            "timestep": torch.tensor([10.0]),
            "encoder_hidden_states": torch.randn((1, 8, int(config.get("cross_attention_dim") or 768)), generator=generator),
        }
        if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embeds and size/crop ids
            time_ids = 6
            text = int(config["projection_class_embeddings_input_dim"]) - time_ids * int(config["addition_time_embed_dim"])
            inputs["added_cond_kwargs"] = {
                "text_embeds": torch.randn((1, text), generator=generator),
                "time_ids": torch.randn((1, time_ids), generator=generator),
            }
        elif config.get("addition_embed_type") or config.get("class_embed_type"):
            raise _no_default(directory, "extra conditioning inputs")
        return inputs
    if directory.class_name in ("UNet2DModel",):
        return {"sample": sample, "timestep": torch.tensor([10.0])}
    if directory.class_name.startswith("Autoencoder") or directory.class_name == "VQModel":
        return {"sample": sample}
    raise _no_default(directory, "an unknown diffusers class")
