"""Checkpoint reading and writing: formats, wrapped state dicts, refusals and messages."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from autoperm import CheckpointError, load_state_dict, save_state_dict


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"a.weight": torch.randn(3, 4), "a.bias": torch.randn(3), "bn.num_batches_tracked": torch.tensor(7)}


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    sd = _state_dict()
    path = tmp_path / f"model{suffix}"
    save_state_dict(sd, path)
    loaded = load_state_dict(path)
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) and loaded[k].dtype == sd[k].dtype for k in sd)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_wrapped_checkpoint_is_unwrapped_and_logged(tmp_path: Path, key: str, caplog) -> None:
    sd = _state_dict()
    path = tmp_path / "wrapped.pt"
    torch.save({key: sd, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    with caplog.at_level(logging.INFO, logger="autoperm.io"):
        loaded = load_state_dict(path)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    assert f"under {key!r}" in caplog.text


def test_missing_file_and_garbage_are_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothere.pt"):
        load_state_dict(tmp_path / "nothere.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*garbage.pt"):
        load_state_dict(garbage)
    odd = tmp_path / "odd.pt"
    torch.save({"epoch": 3, "lr": 0.1}, odd)
    with pytest.raises(CheckpointError, match=r"not a state dict of tensors .*'epoch'"):
        load_state_dict(odd)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match="holds a list"):
        load_state_dict(listed)


def test_refuses_to_overwrite_an_input(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    save_state_dict(_state_dict(), path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="refusing to overwrite input"):
        save_state_dict({"x": torch.zeros(2)}, tmp_path / "." / "a.pt", inputs=[path])
    assert path.read_bytes() == before


def test_non_contiguous_and_shared_tensors_save_as_safetensors(tmp_path: Path) -> None:
    base = torch.randn(4, 5)
    sd = {"t": base.T, "shared": base, "also": base}
    save_state_dict(sd, tmp_path / "x.safetensors")
    loaded = load_state_dict(tmp_path / "x.safetensors")
    assert torch.equal(loaded["t"], base.T) and torch.equal(loaded["also"], base)
