"""Memory-mapped safetensors: same tensors as safetensors' own loader, inputs never modified."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import autoperm
from autoperm.models import MLP
from autoperm.errors import CheckpointError
from autoperm.io import mmap_safetensors, write_safetensors


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 3, generator=generator),
        "half": torch.randn(4, generator=generator).to(torch.bfloat16),
        "steps": torch.tensor(7),
        "empty": torch.zeros(0, 2),
    }


def test_mmap_reads_what_safetensors_wrote(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), str(path))
    loaded = mmap_safetensors(path)
    reference = load_file(str(path))
    assert loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)


def test_writer_round_trips_through_safetensors(tmp_path: Path) -> None:
    tensors = _tensors()
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {k: (list(v.shape), v.dtype) for k, v in tensors.items()}, tensors.__getitem__)
    reference = load_file(str(path))
    assert all(torch.equal(reference[k], v) for k, v in tensors.items())
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_writes_to_mapped_tensors_never_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), str(path))
    before = _digest(path)
    loaded = mmap_safetensors(path)
    loaded["w"].mul_(0).add_(3)  # private mapping: only this process's copy changes
    assert _digest(path) == before
    assert torch.equal(mmap_safetensors(path)["w"], _tensors()["w"])


def test_weight_matching_on_mapped_checkpoints_leaves_them_untouched(tmp_path: Path) -> None:
    model = MLP(in_features=8, hidden=16, depth=2, num_classes=3)
    spec = autoperm.infer_spec(model, torch.randn(1, 8))
    sd_a = {k: v.contiguous() for k, v in model.state_dict().items()}
    planted = autoperm.random_permutation(spec, seed=1)
    sd_b = autoperm.apply_permutation(spec, planted, sd_a)
    save_file(sd_a, str(tmp_path / "a.safetensors"))
    save_file({k: v.contiguous() for k, v in sd_b.items()}, str(tmp_path / "b.safetensors"))
    digests = {p.name: _digest(p) for p in tmp_path.iterdir()}
    result = autoperm.weight_matching(spec, mmap_safetensors(tmp_path / "a.safetensors"), mmap_safetensors(tmp_path / "b.safetensors"))
    aligned = autoperm.apply_permutation(spec, result.perms, sd_b)
    assert all(torch.equal(aligned[k], sd_a[k]) for k in sd_a)
    assert {p.name: _digest(p) for p in tmp_path.iterdir()} == digests


def test_bad_files_raise_checkpoint_error(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="short.safetensors"):
        mmap_safetensors(short)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        mmap_safetensors(broken)
    with pytest.raises(CheckpointError, match="missing.safetensors"):
        mmap_safetensors(tmp_path / "missing.safetensors")


def test_writer_rejects_a_wrong_tensor_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    with pytest.raises(CheckpointError, match="'w'"):
        write_safetensors(path, {"w": ([2, 2], torch.float32)}, lambda name: torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


_FREED_BUFFER_SCRIPT = """
import sys
import torch
from autoperm.io import unmap_large_allocations

def resident_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024

assert unmap_large_allocations()
large = torch.ones(4 << 20)  # 16 MiB: freed, it would raise glibc's threshold for the buffers below
del large
before = resident_mib()
buffers = [torch.ones(2 << 20) for _ in range(3)]  # 8 MiB each
del buffers
print(resident_mib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_large_buffers_leave_the_process() -> None:
    """With unmap_large_allocations, freed 8 MiB buffers do not stay in the resident set."""
    run = subprocess.run([sys.executable, "-c", _FREED_BUFFER_SCRIPT], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True)
    assert float(run.stdout.strip()) < 4.0, run.stdout
