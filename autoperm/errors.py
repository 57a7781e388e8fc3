"""The exception hierarchy of autoperm.

Every error a user can meet derives from :class:`AutopermError`; its message says what was
wrong, where (model node, parameter, file or YAML field) and what to do about it.
"""

from __future__ import annotations

__all__ = [
    "AutopermError",
    "TraceError",
    "InputMismatchError",
    "SpecError",
    "SolverError",
    "CheckpointError",
    "ModelLoadError",
    "DataError",
]


class AutopermError(Exception):
    """Base class of every error autoperm raises on bad input."""


class TraceError(AutopermError):
    """A model could not be traced into a graph (torch.fx and torch.export both failed)."""


class InputMismatchError(TraceError):
    """The model traced, but running it on the example inputs failed (wrong shape or dtype)."""


class SpecError(AutopermError):
    """A permutation spec is invalid, or does not match the model or state dict it is used with."""


class SolverError(AutopermError):
    """A solver was given inputs it cannot work with (mismatched state dicts, no data, ...)."""


class CheckpointError(AutopermError):
    """A checkpoint file cannot be read, written, or does not fit the model."""


class ModelLoadError(AutopermError):
    """A `package.module:attr` model path could not be imported or instantiated."""


class DataError(AutopermError):
    """A data source cannot be loaded, or does not yield ``(inputs, targets)`` batches."""
