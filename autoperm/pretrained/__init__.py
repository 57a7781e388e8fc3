"""Models and checkpoints as people keep them: Hugging Face and diffusers directories.

``config.json`` says which class to build (``architectures`` for transformers, ``_class_name``
for diffusers); the model is built from it on the meta device (no weights allocated) with
example inputs that fit its type. Weights are read and written only through :mod:`autoperm.io`
(single files or shards, read lazily, written back in the same layout).
Stored tensors that transformers renames, or stacks (mixture-of-experts weights), when loading
are read under the class's names and written back under the stored ones
(:mod:`~autoperm.pretrained.stored_names`); the configs of two checkpoints are compared before
they are aligned (:mod:`~autoperm.pretrained.configs`).
:mod:`~autoperm.pretrained.stable_diffusion` builds the UNet of an LDM single-file Stable
Diffusion checkpoint through diffusers' own single-file conversion.
"""

from autoperm.pretrained.configs import (
    check_config_file,
    check_same_model,
    config_differences,
)
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
from autoperm.pretrained.stable_diffusion import StableDiffusionUNet, read_ldm_unet
from autoperm.pretrained.stored_names import (
    Conversion,
    StoredNames,
    load_directory_weights,
    save_directory_weights,
    stored_names,
)

__all__ = [
    "Conversion",
    "ModelDirectory",
    "StableDiffusionUNet",
    "StoredNames",
    "build_from_directory",
    "check_config_file",
    "check_names",
    "check_same_model",
    "config_differences",
    "default_inputs",
    "is_model_directory",
    "load_directory_weights",
    "load_pretrained",
    "read_ldm_unet",
    "read_model_directory",
    "save_directory_weights",
    "stored_names",
    "tied_names",
]
