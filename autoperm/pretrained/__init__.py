"""Models and checkpoints as people keep them: Hugging Face and diffusers directories.

``config.json`` says which class to build (``architectures`` for transformers, ``_class_name``
for diffusers); the model is built from it on the meta device (no weights allocated) with
example inputs that fit its type. Weights are read lazily from single files or shards and
written back in the same layout (:mod:`autoperm.pretrained.shards`).
"""

from autoperm.pretrained.directory import (
    ModelDirectory,
    build_from_directory,
    check_names,
    default_inputs,
    is_model_directory,
    load_pretrained,
    read_model_directory,
    tied_names,
)
from autoperm.pretrained.shards import CheckpointLayout, find_layout, is_checkpoint_directory, load_directory, save_directory

__all__ = [
    "CheckpointLayout",
    "ModelDirectory",
    "build_from_directory",
    "check_names",
    "default_inputs",
    "find_layout",
    "is_checkpoint_directory",
    "is_model_directory",
    "load_directory",
    "load_pretrained",
    "read_model_directory",
    "save_directory",
    "tied_names",
]
