"""The architecture written down in pyproject.toml ([tool.importlinter]) holds.

Layers trace -> infer -> spec consumers (solvers, evaluate) -> API / CLI / demo, with the spec,
data, models, io and errors at the ground; solvers and evaluate import neither trace nor infer;
no import cycles between sibling modules or packages.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

importlinter_cli = pytest.importorskip("importlinter.cli", reason="import-linter is in the test extra")

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the package is found on sys.path from the repository root
    status = importlinter_cli.lint_imports(config_filename=os.fspath(ROOT / "pyproject.toml"), no_cache=True)
    report = capsys.readouterr().out
    assert status == 0, report
    assert "BROKEN" not in report and "6 kept, 0 broken" in report


def test_a_broken_contract_is_caught(tmp_path, capsys, monkeypatch):
    """The check can fail: a contract that the code breaks (infer imports trace) is reported."""
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "autoperm"\n\n[[tool.importlinter.contracts]]\n'
        'name = "wrong on purpose"\ntype = "forbidden"\nsource_modules = ["autoperm.infer"]\n'
        'forbidden_modules = ["autoperm.trace"]\n'
    )
    monkeypatch.chdir(ROOT)
    status = importlinter_cli.lint_imports(config_filename=os.fspath(config), no_cache=True)
    assert status != 0 and "wrong on purpose BROKEN" in capsys.readouterr().out
