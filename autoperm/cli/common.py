"""Shared pieces of the CLI: model loading (`package.module:attr` or a model directory), inputs, errors."""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from autoperm.errors import AutopermError, ModelLoadError

__all__ = [
    "run_cli",
    "load_model",
    "parse_kwargs",
    "parse_shape",
    "make_inputs",
    "model_options",
    "model_settings",
    "build_model",
    "ModelArgs",
    "load_spec_or_infer",
]

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "double": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "long": torch.long,
    "int64": torch.long,
    "int": torch.long,
    "int32": torch.int32,
}


def run_cli(command: click.Group) -> None:
    """Run a click group, turning autoperm errors into one message and exit code 1."""
    from autoperm.io import unmap_large_allocations

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    warnings.showwarning = _show_warning
    unmap_large_allocations()  # freed cost-product buffers leave the process at once: a lower peak
    try:
        command.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Exit as error:
        sys.exit(error.exit_code)
    except AutopermError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are Python literals, anything else stays a string."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ModelLoadError(f"--kwargs {item!r}: expected key=value with a Python identifier as key")
        try:
            kwargs[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            kwargs[key] = raw
    return kwargs


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``1,3,32,32`` (or ``1x3x32x32``) into a shape tuple."""
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ModelLoadError(f"--input-shape {text!r}: expected comma-separated integers such as 1,3,32,32") from None
    if not shape or any(s < 1 for s in shape):
        raise ModelLoadError(f"--input-shape {text!r}: every size must be a positive integer")
    return shape


def load_model(path: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Import ``package.module:attr`` and call it with ``kwargs`` to get an ``nn.Module``.

    ``attr`` may be a class, a factory function, or an ``nn.Module`` instance. A Hugging Face
    model class (one with a ``config_class``) is built from ``config_class(**kwargs)``, so
    ``transformers:BertModel --kwargs hidden_size=64`` works without a config object.

    Raises:
        ModelLoadError: the module or attribute cannot be imported, or the call fails.
    """
    kwargs = dict(kwargs or {})
    module_name, sep, attr_path = path.partition(":")
    if not sep or not module_name or not attr_path:
        raise ModelLoadError(f"model {path!r}: expected the form package.module:attr (e.g. torchvision.models:resnet18)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelLoadError(f"model {path!r}: cannot import module {module_name!r}: {error}") from error
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ModelLoadError(f"model {path!r}: module {module_name!r} has no attribute {attr_path!r}") from None
    if isinstance(target, nn.Module):
        if kwargs:
            raise ModelLoadError(f"model {path!r} is already a module instance; --kwargs cannot be applied")
        return target
    if not callable(target):
        raise ModelLoadError(f"model {path!r} is neither a class, a factory function nor a module")
    try:
        config_class = getattr(target, "config_class", None) if inspect.isclass(target) else None
        if config_class is not None and "config" not in kwargs:
            model = target(config_class(**kwargs))
        else:
            model = target(**kwargs)
    except Exception as error:  # the user's constructor can raise anything
        raise ModelLoadError(f"model {path!r}: calling it with {kwargs} failed: {type(error).__name__}: {error}") from error
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model {path!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def make_inputs(
    model: nn.Module, shapes: Sequence[tuple[int, ...]], dtype: str = "float32", seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random example inputs of the given shapes (integer inputs stay below every embedding size)."""
    if dtype not in _DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r}: choose one of {', '.join(sorted(_DTYPES))}")
    torch_dtype = _DTYPES[dtype]
    generator = torch.Generator().manual_seed(seed)
    if torch_dtype.is_floating_point:
        return tuple(torch.randn(shape, generator=generator).to(torch_dtype) for shape in shapes)
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    high = min(sizes) if sizes else 2
    return tuple(torch.randint(0, high, shape, generator=generator, dtype=torch_dtype) for shape in shapes)


class ModelArgs:
    """The model-related options every command shares, bundled.

    MODEL is ``package.module:attr`` or a model directory (``config.json`` written by
    ``save_pretrained`` of transformers or diffusers; see :mod:`autoperm.pretrained`).
    """

    def __init__(self, model: str, kwargs: Sequence[str], input_shape: Sequence[str], dtype: str, seed: int = 0):
        self.path = model
        self.kwargs = parse_kwargs(kwargs)
        self.shapes = [parse_shape(s) for s in input_shape]
        self.dtype = dtype
        self.seed = seed
        self.directory = None
        self.name = model
        if Path(model).is_dir():
            from autoperm.pretrained import read_model_directory

            self.directory = read_model_directory(model)
            self.name = self.directory.name
            if self.kwargs:
                raise ModelLoadError(
                    f"--kwargs cannot be applied to the model directory {model!r}; its config.json defines the model"
                )

    def build(self, weights: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, ...] | dict[str, Any]]:
        """The model and its example inputs.

        A model directory is built on the meta device (no weights allocated), with inputs on the
        meta device too, unless ``weights`` asks for a real model: then its own weights are
        loaded (random ones if the directory has none).
        """
        if self.directory is not None:
            return self._build_directory(weights)
        model = load_model(self.path, self.kwargs)
        if not self.shapes:
            raise ModelLoadError(
                f"model {self.path!r}: give --input-shape (e.g. --input-shape 1,3,32,32) so the model can be traced"
            )
        return model, make_inputs(model, self.shapes, self.dtype, self.seed)

    def infer(self, model: nn.Module, inputs: Any, tracer: str = "auto"):
        """``infer_spec`` on the built model; a directory model that does not trace on the meta
        device (an op without a meta kernel) is built again on the CPU and traced there."""
        from autoperm.errors import TraceError
        from autoperm.infer import infer_spec

        try:
            return infer_spec(model, inputs, tracer=tracer, model_name=self.name)
        except TraceError as error:
            on_meta = any(t.is_meta for t in model.state_dict().values())
            if self.directory is None or not on_meta:
                raise
            logging.getLogger(__name__).info("tracing on the meta device failed (%s); tracing on the CPU", error)
        model, inputs = self._build_directory(weights=False, device="cpu")
        return infer_spec(model, inputs, tracer=tracer, model_name=self.name)

    def _build_directory(
        self, weights: bool, device: str = "meta"
    ) -> tuple[nn.Module, tuple[torch.Tensor, ...] | dict[str, Any]]:
        from autoperm.io import is_checkpoint_directory
        from autoperm.pretrained import build_from_directory, default_inputs, load_pretrained

        directory = self.directory
        if weights:
            device = "cpu"
            model = load_pretrained(directory) if is_checkpoint_directory(directory.path) else build_from_directory(directory, "cpu")
        else:
            model = build_from_directory(directory, device)
        if self.shapes:
            return model, tuple(x.to(device) for x in make_inputs(model, self.shapes, self.dtype, self.seed))
        return model, default_inputs(model, directory, device=device, seed=self.seed)


def model_settings(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with --kwargs, --input-shape and --dtype."""
    function = click.option(
        "--dtype", default="float32", show_default=True, help="dtype of the example inputs (use 'long' for token ids)."
    )(function)
    function = click.option(
        "--input-shape", "input_shape", multiple=True, metavar="SHAPE",
        help="Example input shape such as 1,3,32,32; repeat for several inputs (default for model directories: "
        "token ids, pixel values or a UNet's latent, timestep and encoder states).",
    )(function)
    return click.option(
        "--kwargs", "kwargs", multiple=True, metavar="KEY=VALUE",
        help="Keyword argument for the model constructor (Python literal); repeatable.",
    )(function)


def model_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with MODEL (package.module:attr or a model directory) and :func:`model_settings`."""
    return click.argument("model")(model_settings(function))


def build_model(model: str, kwargs: Sequence[str], input_shape: Sequence[str], dtype: str, weights: bool = False):
    """Load MODEL with its options; returns ``(module, example_inputs)`` (see :meth:`ModelArgs.build`)."""
    return ModelArgs(model, kwargs, input_shape, dtype).build(weights)


def load_spec_or_infer(
    spec_path: str | None, model: nn.Module, inputs: Any, model_path: str, args: ModelArgs | None = None
):
    """The spec from ``--spec`` (checked against the model), or one inferred from the model."""
    from autoperm.infer import infer_spec
    from autoperm.spec import PermutationSpec

    state_dict = model.state_dict()
    if spec_path:
        spec = PermutationSpec.from_yaml(spec_path)
        spec.check_state_dict(state_dict, what=f"model {model_path!r}")
        return spec
    if args is not None:
        return args.infer(model, inputs)
    return infer_spec(model, inputs, model_name=model_path)
