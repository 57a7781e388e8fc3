"""Models and checkpoints as people keep them: Hugging Face and diffusers directories.

``config.json`` says which class to build (``architectures`` for transformers, ``_class_name``
for diffusers); the model is built from it on the meta device (no weights allocated) with
example inputs that fit its type. Weights are read and written only through :mod:`autoperm.io`
(single files or shards, read lazily, written back in the same layout).
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

__all__ = [
    "ModelDirectory",
    "build_from_directory",
    "check_names",
    "default_inputs",
    "is_model_directory",
    "load_pretrained",
    "read_model_directory",
    "tied_names",
]
