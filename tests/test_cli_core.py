"""`showo convert` and `showo complete` from the command line, and their one-line errors."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from conftest import REF
from showo_mlx.cli import app

runner = CliRunner()
FIXTURE_ARGS = ["--vq", str(REF / "magvitv2"), "--tokenizer", str(REF / "tokenizer")]


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output + result.stderr
    return lines[0]


def test_convert_and_complete_from_the_cli(tmp_path, pipe):
    dst = tmp_path / "tiny"
    result = runner.invoke(app, ["convert", str(REF / "showo"), str(dst), *FIXTURE_ARGS])
    assert result.exit_code == 0, result.stderr
    assert (dst / "config.json").exists() and "wrote" in result.stderr
    result = runner.invoke(app, ["complete", "a red cat", "--model", str(dst), "--max-tokens", "12"])
    assert result.exit_code == 0, result.stderr
    # the CLI prints the prompt then the greedy continuation of the same model through the API
    expected = pipe.complete("a red cat", max_tokens=12)
    assert result.stdout == "a red cat" + expected + "\n"
    assert "peak memory" in result.stderr


def test_quantized_convert_from_the_cli(tmp_path):
    dst = tmp_path / "q4"
    result = runner.invoke(app, ["convert", str(REF / "showo"), str(dst), "-q", "--q-bits", "4", "--q-group-size", "32", *FIXTURE_ARGS])
    assert result.exit_code == 0, result.stderr
    import json

    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    assert cfg["magvit_dtype"] == "float16"
    assert cfg["dtype"] == "float16"  # quantized folders default to float16 scales and vectors
    scales = [v for k, v in mx.load(str(dst / "model.safetensors")).items() if k.endswith(".scales")]
    assert scales and all(v.dtype == mx.float16 for v in scales)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["convert", "no/such-folder-here/x", "OUT"], "does not exist"),
        (["convert", str(REF / "tokenizer"), "OUT", *FIXTURE_ARGS], "config.json"),
        (["convert", str(REF / "magvitv2"), "OUT", *FIXTURE_ARGS], "not a Show-o"),
        (["convert", str(REF / "showo"), "OUT", "-q", "--q-bits", "7", *FIXTURE_ARGS], "bits"),
        (["convert", str(REF / "showo"), "OUT", "-q", "--q-group-size", "100", *FIXTURE_ARGS], "group size"),
        (["convert", str(REF / "showo"), "OUT", "--dtype", "float8", *FIXTURE_ARGS], "dtype"),
    ],
)
def test_convert_bad_arguments(tmp_path, args, needle):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    line = one_line_error(runner.invoke(app, args))
    assert needle in line
    assert not (tmp_path / "out").exists()


def test_convert_source_without_weights(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((REF / "showo" / "config.json").read_text())
    line = one_line_error(runner.invoke(app, ["convert", str(src), str(tmp_path / "out"), *FIXTURE_ARGS]))
    assert "weight" in line or "pytorch_model" in line


def test_convert_refuses_existing_destination(tmp_path, converted):
    line = one_line_error(runner.invoke(app, ["convert", str(REF / "showo"), str(converted), *FIXTURE_ARGS]))
    assert "--force" in line


def test_missing_required_argument_is_a_usage_error():
    result = runner.invoke(app, ["convert"])
    assert result.exit_code == 2


def test_complete_with_a_missing_model_folder(tmp_path):
    line = one_line_error(runner.invoke(app, ["complete", "hi", "--model", str(tmp_path / "none")]))
    assert "neither a folder nor a Hub id" in line or "does not exist" in line


def test_console_script_entry_points(converted):
    # `python cli.py` (top-level thin entry point) and the `showo` console script both work
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "cli.py"), "complete", "a", "--model", str(converted), "--max-tokens", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("a")
