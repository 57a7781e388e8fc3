"""`autoperm spec` and `autoperm verify`: round trips and one clear message per bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from click.testing import CliRunner

from autoperm import PermutationSpec
from autoperm.cli import cli


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoperm", *args], capture_output=True, text=True, timeout=300)


def test_spec_then_verify_round_trip(tmp_path):
    out = tmp_path / "r20.yaml"
    result = CliRunner().invoke(cli, ["spec", "autoperm.models:resnet20", "--input-shape", "1,3,32,32", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "layer1.0.conv1" in result.output and "12 groups written" in result.output
    spec = PermutationSpec.from_yaml(out)
    assert len(spec.active_groups) == 12
    result = CliRunner().invoke(cli, ["verify", "autoperm.models:resnet20", "--input-shape", "1,3,32,32", "--spec", str(out)])
    assert result.exit_code == 0, result.output
    assert "OK: outputs unchanged" in result.output


def test_spec_to_stdout_with_kwargs():
    result = CliRunner().invoke(cli, ["spec", "autoperm.models:MLP", "--kwargs", "in_features=12", "--kwargs", "hidden=8",
                                      "--input-shape", "2,12"])
    assert result.exit_code == 0, result.output
    spec = PermutationSpec.from_yaml(result.stdout.split("group ")[0] if "group " in result.stdout else result.stdout)
    assert [g.size for g in spec.active_groups] == [8, 8, 8]


def test_edited_spec_with_unsound_group_fails_verify(tmp_path):
    good = tmp_path / "mlp.yaml"
    assert CliRunner().invoke(cli, ["spec", "autoperm.models:MLP", "--kwargs", "in_features=12", "--input-shape", "2,12",
                                    "-o", str(good)]).exit_code == 0
    text = good.read_text().replace("  - {param: layers.0.bias, axis: 0, role: out}\n", "")  # break the group (a scale group: members have roles)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = run("verify", "autoperm.models:MLP", "--kwargs", "in_features=12", "--input-shape", "2,12", "--spec", str(bad))
    assert result.returncode == 1
    assert "outputs changed under a random permutation" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["spec", "no_such_package.models:Net", "--input-shape", "1,3"], "cannot import module 'no_such_package.models'"),
        (["spec", "autoperm.models:Nope", "--input-shape", "1,3"], "has no attribute 'Nope'"),
        (["spec", "autoperm.models", "--input-shape", "1,3"], "package.module:attr"),
        (["spec", "autoperm.models:MLP", "--kwargs", "depth=oops", "--input-shape", "1,784"], "calling it with"),
        (["spec", "autoperm.models:MLP", "--input-shape", "1,5"], "the example inputs do not fit the model: at node 'layers_0'"),
        (["spec", "autoperm.models:MLP", "--input-shape", "1,a"], "--input-shape '1,a'"),
        (["spec", "autoperm.models:MLP"], "give --input-shape"),
        (["spec", "autoperm.models:MLP", "--input-shape", "1,784", "--dtype", "complex"], "--dtype 'complex'"),
        (["verify", "autoperm.models:MLP", "--input-shape", "1,784", "--spec", "/nonexistent/spec.yaml"], "cannot read spec file"),
    ],
)
def test_bad_input_is_one_clear_message(args, message):
    result = run(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_spec_for_another_model_is_rejected(tmp_path):
    out = tmp_path / "mlp.yaml"
    assert CliRunner().invoke(cli, ["spec", "autoperm.models:MLP", "--input-shape", "1,784", "-o", str(out)]).exit_code == 0
    result = run("verify", "autoperm.models:resnet20", "--input-shape", "1,3,32,32", "--spec", str(out))
    assert result.returncode == 1
    assert "does not match the permutation spec" in result.stderr and "missing 'layers.0.weight'" in result.stderr


def test_invalid_yaml_field_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        version: 1
        groups:
        - name: g
          size: many
          members: []
        """))
    result = run("verify", "autoperm.models:MLP", "--input-shape", "1,784", "--spec", str(path))
    assert result.returncode == 1
    assert "groups[0](g).size" in result.stderr


def test_failed_spec_leaves_no_output_file(tmp_path):
    out = tmp_path / "never.yaml"
    result = run("spec", "autoperm.models:MLP", "--input-shape", "1,5", "-o", str(out))
    assert result.returncode == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_integer_inputs_for_token_models():
    pytest.importorskip("transformers")
    result = run("verify", "transformers:GPT2LMHeadModel", "--kwargs", "n_embd=32", "--kwargs", "n_layer=1", "--kwargs", "n_head=2",
                 "--kwargs", "vocab_size=50", "--kwargs", "n_positions=16", "--kwargs", "use_cache=False",
                 "--input-shape", "1,8", "--dtype", "long")
    assert result.returncode == 0, result.stderr
    assert "OK: outputs unchanged" in result.stdout
