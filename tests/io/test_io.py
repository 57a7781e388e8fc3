"""Every writer of autoperm.io gives its outputs the mode the umask gives new files.

One atomic writer serves torch and safetensors files, sharded directories, the memory-mapped
writer and the spec's YAML; under umask 0o022 and 0o077 each output must get ``0o666 & ~umask``
(folders ``0o777 & ~umask``), as a plain ``open()`` would give, and no temporary file is left.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from autoperm import (
    Member,
    PermutationGroup,
    PermutationSpec,
    load_state_dict,
    save_state_dict,
)
from autoperm.io import (
    find_layout,
    mmap_safetensors,
    save_directory,
    write_safetensors,
    write_text_atomic,
)

MASKS = [0o022, 0o077]


@pytest.fixture(params=MASKS, ids=oct)
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test under the given umask and put the previous one back afterwards."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=generator), "b": torch.randn(3, generator=generator)}


def _write_safetensors(path: Path) -> None:
    tensors = _tensors()
    write_safetensors(path, {name: (list(t.shape), t.dtype) for name, t in tensors.items()}, tensors.__getitem__)


def _write_spec(path: Path) -> None:
    group = PermutationGroup(name="P0", size=3, members=(Member(param="w", axis=0), Member(param="b", axis=0)))
    PermutationSpec(groups=(group,), shapes={"w": (3, 4), "b": (3,)}).to_yaml(path)


WRITERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "write_safetensors": ("w.safetensors", _write_safetensors),
    "save_state_dict_pt": ("s.pt", lambda path: save_state_dict(_tensors(), path)),
    "save_state_dict_safetensors": ("s.safetensors", lambda path: save_state_dict(_tensors(), path)),
    "spec_to_yaml": ("spec.yaml", _write_spec),
    "write_text_atomic": ("report.json", lambda path: write_text_atomic(path, "{}\n")),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_file_outputs_follow_the_umask(tmp_path: Path, umask: int, writer: str) -> None:
    name, write = WRITERS[writer]
    write(tmp_path / name)
    assert _mode(tmp_path / name) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_replacing_a_file_gives_the_new_one_the_umask_mode(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"old")
    path.chmod(0o600)
    _write_safetensors(path)
    assert _mode(path) == 0o666 & ~umask
    assert torch.equal(load_state_dict(path)["w"], _tensors()["w"])


def test_sharded_directory_outputs_follow_the_umask(tmp_path: Path, umask: int) -> None:
    source = tmp_path / "source"
    (source / "tokenizer").mkdir(parents=True)
    tensors = _tensors()
    save_file({"w": tensors["w"]}, str(source / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({"b": tensors["b"]}, str(source / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 60}, "weight_map": {
        "w": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    (source / "config.json").write_text("{}")
    (source / "config.json").chmod(0o600)  # copied files get the umask's mode, not their source's
    (source / "tokenizer" / "vocab.txt").write_text("a\n")
    output = tmp_path / "out" / "aligned"
    save_directory(load_state_dict(source), find_layout(source), output, inputs=[source])
    assert _mode(output) == 0o777 & ~umask
    for entry in output.rglob("*"):
        assert _mode(entry) == (0o777 if entry.is_dir() else 0o666) & ~umask, entry.name
    assert sorted(p.name for p in output.parent.iterdir()) == ["aligned"]
    assert all(torch.equal(load_state_dict(output)[k], tensors[k]) for k in tensors)


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    _write_safetensors(path)
    before = path.read_bytes()

    def broken(name: str) -> torch.Tensor:
        raise RuntimeError(f"cannot produce {name}")

    with pytest.raises(RuntimeError, match="cannot produce w"):
        write_safetensors(path, {"w": ([3, 4], torch.float32)}, broken)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_json_objects_are_read_with_the_file_named(tmp_path):
    from autoperm.errors import CheckpointError, ModelLoadError
    from autoperm.io import read_json_object

    good, broken, listed = tmp_path / "config.json", tmp_path / "broken.json", tmp_path / "list.json"
    good.write_text('{"a": 1}')
    broken.write_text("{not json")
    listed.write_text("[1, 2]")
    assert read_json_object(good) == {"a": 1}
    with pytest.raises(CheckpointError, match="broken.json"):
        read_json_object(broken)
    with pytest.raises(ModelLoadError, match="list.json.*not a JSON object"):
        read_json_object(listed, ModelLoadError)


def test_directory_shards_keep_dtypes_metadata_and_transformed_tensors(tmp_path: Path) -> None:
    """Shards written a tensor at a time hold every transformed tensor, in the stored dtype, with the metadata."""
    source = tmp_path / "source"
    source.mkdir()
    tensors = {f"layer{i}.weight": torch.randn(4, 3).to(torch.bfloat16) for i in range(5)}
    tensors["layer0.steps"] = torch.arange(3)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt", "note": "kept"})
    (source / "config.json").write_text("{}")
    seen: list[str] = []

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        seen.append(name)
        return tensor.float() * 2 if tensor.is_floating_point() else tensor

    save_directory(load_state_dict(source), find_layout(source), tmp_path / "out", transform=transform)
    written = load_state_dict(tmp_path / "out")
    assert sorted(seen) == sorted(tensors)
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    for name, tensor in tensors.items():
        assert written[name].dtype == tensor.dtype
        expected = (tensor.float() * 2).to(tensor.dtype) if tensor.is_floating_point() else tensor
        assert torch.equal(written[name], expected), name
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "kept"}


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32])
def test_float8_and_unsigned_tensors_round_trip_through_the_writer(tmp_path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file

    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).to(dtype)
    path = tmp_path / "w.safetensors"
    write_safetensors(path, {"w": ((3, 4), dtype)}, lambda name: tensor)
    assert torch.equal(mmap_safetensors(path)["w"].view(torch.uint8), tensor.view(torch.uint8))
    assert torch.equal(load_file(str(path))["w"].view(torch.uint8), tensor.view(torch.uint8))
