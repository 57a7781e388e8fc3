"""Shared pieces of the CLI: model loading from `package.module:attr`, inputs, error handling."""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    warnings.showwarning = _show_warning
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
    """The model-related options every command shares, bundled."""

    def __init__(self, model: str, kwargs: Sequence[str], input_shape: Sequence[str], dtype: str, seed: int = 0):
        self.path = model
        self.kwargs = parse_kwargs(kwargs)
        self.shapes = [parse_shape(s) for s in input_shape]
        self.dtype = dtype
        self.seed = seed

    def build(self) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        model = load_model(self.path, self.kwargs)
        if not self.shapes:
            raise ModelLoadError(
                f"model {self.path!r}: give --input-shape (e.g. --input-shape 1,3,32,32) so the model can be traced"
            )
        return model, make_inputs(model, self.shapes, self.dtype, self.seed)


def model_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a click command with MODEL, --kwargs, --input-shape and --dtype."""
    function = click.option(
        "--dtype", default="float32", show_default=True, help="dtype of the example inputs (use 'long' for token ids)."
    )(function)
    function = click.option(
        "--input-shape", "input_shape", multiple=True, metavar="SHAPE",
        help="Example input shape such as 1,3,32,32; repeat for several inputs.",
    )(function)
    function = click.option(
        "--kwargs", "kwargs", multiple=True, metavar="KEY=VALUE",
        help="Keyword argument for the model constructor (Python literal); repeatable.",
    )(function)
    return click.argument("model")(function)


def build_model(model: str, kwargs: Sequence[str], input_shape: Sequence[str], dtype: str):
    """Load MODEL with its options; returns ``(module, example_inputs)``."""
    return ModelArgs(model, kwargs, input_shape, dtype).build()


def load_spec_or_infer(spec_path: str | None, model: nn.Module, inputs: tuple[torch.Tensor, ...], model_path: str):
    """The spec from ``--spec`` (checked against the model), or one inferred from the model."""
    from autoperm.infer import infer_spec
    from autoperm.spec import PermutationSpec

    state_dict = model.state_dict()
    if spec_path:
        spec = PermutationSpec.from_yaml(spec_path)
        spec.check_state_dict(state_dict, what=f"model {model_path!r}")
        return spec
    return infer_spec(model, inputs)
