"""Reading and writing weights: every file autoperm reads or writes goes through this package.

- :mod:`~autoperm.io.state_dict`: :func:`load_state_dict` dispatches on what a path is (a
  ``save_pretrained`` directory, a ``.safetensors`` file, a torch checkpoint read with
  ``weights_only``); :func:`save_state_dict` writes one file.
- :mod:`~autoperm.io.directories`: Hugging Face and diffusers directories, single files or
  shards with an index, read lazily and written back in the same layout.
- :mod:`~autoperm.io.memory_map`: safetensors files mapped privately (no copy) and written one
  tensor at a time, for checkpoints larger than memory; :func:`unmap_large_allocations` keeps
  freed large buffers from staying in the process.
- :mod:`~autoperm.io.single_file`: one weights file read lazily and written back in its own
  format, names, order, dtypes and metadata, one tensor at a time.
- :mod:`~autoperm.io.stable_diffusion`: Stable Diffusion as kept: LDM single files (which
  tensors are the UNet, VAE, text encoders) and diffusers pipeline folders (``model_index.json``).
- :mod:`~autoperm.io.formats`: the single-file readers (torch, safetensors headers).
- :mod:`~autoperm.io.atomic`: the one atomic writer (temporary file, ``fsync``, rename; modes
  follow the umask), also used for specs and reports.

This package imports nothing from autoperm but :mod:`autoperm.errors`.
"""

from autoperm.io.atomic import write_text_atomic
from autoperm.io.directories import (
    CheckpointLayout,
    find_layout,
    is_checkpoint_directory,
    load_directory,
    save_directory,
)
from autoperm.io.formats import read_json_object, read_torch_file
from autoperm.io.memory_map import (
    mmap_safetensors,
    unmap_large_allocations,
    write_safetensors,
)
from autoperm.io.single_file import (
    SingleFileLayout,
    read_single_file,
    save_single_file,
)
from autoperm.io.state_dict import (
    load_state_dict,
    save_state_dict,
)

__all__ = [
    "CheckpointLayout",
    "SingleFileLayout",
    "find_layout",
    "is_checkpoint_directory",
    "load_directory",
    "load_state_dict",
    "mmap_safetensors",
    "read_json_object",
    "read_single_file",
    "read_torch_file",
    "save_directory",
    "save_single_file",
    "save_state_dict",
    "unmap_large_allocations",
    "write_safetensors",
    "write_text_atomic",
]
