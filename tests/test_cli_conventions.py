"""Command-line conventions (issue 11 items 2, 3, 6 and the conventions list; issue 16 items 12-13
for the CLI): stray words never become prompts, one `-q` spelling everywhere, library notes on
stderr with --verbose/--quiet, -h/--version/usage/help/examples, output paths checked before any
work. Parsing tests record what the command would run (the model is never loaded for them)."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import REF
from showo_mlx import __version__
from showo_mlx import bench as bench_module
from showo_mlx import cli as cli_module
from showo_mlx.cli import app
from showo_mlx.cli_args import OptionTable, normalize_args
from showo_mlx.convert import QuantizeSpec

IMAGES = REF / "images"
IMAGE, WIDE, MASK = IMAGES / "magvit_in_0.png", IMAGES / "preprocess_in_0.png", IMAGES / "inpaint_mask.png"
runner = CliRunner()


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


class Recording:
    """The session pipeline, except that generate records its prompts and seeds instead of running."""

    def __init__(self, pipe):
        self._pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate(self, prompts, *, seed, **kwargs):
        self.calls.append((list(prompts), list(seed)))
        return []


@pytest.fixture
def recorded(pipe, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    rec = Recording(pipe)
    monkeypatch.setattr(cli_module, "load_pipeline", lambda *a, **k: rec)

    def invoke(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
        assert len(rec.calls) == 1
        return rec.calls.pop()

    return invoke


# -- item 2: stray words -----------------------------------------------------------------------------
@pytest.mark.parametrize("form", [["--seed", "1", "2"], ["--seed", "1", "--seed", "2"], ["--seed", "1,2"], ["-s", "1", "2"],
                                  ["--seed=1", "2"], ["-s1", "2"]])
def test_seed_forms_agree_and_never_add_prompts(recorded, form):
    """`generate "a corgi" --seed 1 2` used to paint "a corgi" with seed 1 and a prompt "2"."""
    assert recorded("generate", "a corgi", *form) == (["a corgi"], [1, 2])


def test_seeds_then_more_prompts_and_the_double_dash(recorded):
    assert recorded("generate", "a corgi", "--seed", "1", "2", "3", "-p", "a cat") == (["a corgi", "a cat"], [1, 2, 3])
    assert recorded("generate", "--seed", "1", "--", "2") == (["2"], [1])  # a prompt that is a number
    assert recorded("generate", "--greedy", "--seed", "4", "--", "true") == (["true"], [4])
    assert recorded("generate", "x", "-s", "5", "-n", "3") == (["x"], [5, 6, 7])


@pytest.mark.parametrize("args,needle", [
    (["generate", "a corgi", "--greedy", "true"], "--greedy is a switch"),
    (["generate", "a corgi", "--low-ram", "False"], "--low-ram is a switch"),
    (["extend", IMAGE, "a lake", "-d", "left", "--greedy", "yes"], "--greedy is a switch"),
    (["complete", "hello", "--seed", "1", "2"], "one --seed"),
    (["ask", IMAGE, "what?", "--seed", "3", "4"], "one --seed"),
    (["generate", "--seed", "1", "2"], "no prompt given"),
    (["generate", "a corgi", "-m", "./models/x"], "--model"),
    (["ask", IMAGE, "what?", "-m", "./models/x"], "--model ./models/x"),
    (["generate", "a corgi", "--seed", "-1"], "2**63 - 1"),
    (["generate", "a corgi", "--seed", str(2**70)], "2**63 - 1"),
    (["generate", "a corgi", "-n", "2", "--seed", str(2**63 - 1)], "2**63 - 1"),
    (["complete", "hello", "--seed", "-1"], "2**63 - 1"),
    (["generate", "a corgi", "--steps", "5000"], "--force"),
    (["generate", "caf\udcc3", "--steps", "1"], "not valid UTF-8"),
    (["generate", "a \ud800 lone surrogate"], "not valid UTF-8"),
])
def test_refused_before_anything_runs(args, needle, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli_module, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    line = one_line_error(runner.invoke(app, [str(a) for a in args]))
    assert needle in line, line
    assert not list(tmp_path.iterdir())


def test_invalid_utf8_bytes_in_argv_are_one_line():
    """The real path: the shell passes bytes that are not UTF-8 (Python keeps them as surrogates)."""
    code = "import sys; from showo_mlx.cli import app; sys.argv[0] = 'showo'; app()"
    out = subprocess.run([sys.executable, "-c", code, "generate", b"caf\xc3(".decode("utf-8", "surrogateescape")],
                         capture_output=True, timeout=60, env={"PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8",
                                                                  "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2, out.stderr
    assert out.stderr.decode().strip().splitlines() == ["error: argument 2 ('caf\\xc3(') is not valid UTF-8 text; "
                                                       "retype it or set a UTF-8 locale"]


def test_normalize_args_leaves_values_alone():
    """Option values that look like seeds or booleans stay values; `--` ends the rewriting."""
    table = OptionTable(switches={"--greedy"}, valued={"--output", "-o", "--prompt"}, seed={"--seed"}, many_seeds=True)
    assert normalize_args(["--prompt", "true", "-o", "2", "--greedy", "x", "--", "--greedy", "true"], table) == \
        ["--prompt", "true", "-o", "2", "--greedy", "x", "--", "--greedy", "true"]
    assert normalize_args(["--seed", "1", "2,3", "a"], table) == ["--seed", "1", "--seed", "2,3", "a"]


# -- item 3: one -q ------------------------------------------------------------------------------------
QUANTIZE_FORMS = {
    "mlx-lm": ["-q", "--q-bits", "8", "--q-group-size", "32", "--q-head-bits", "8"],
    "long, with =": ["--quantize", "--q-bits=8", "--q-group-size=32", "--q-head-bits=8"],
    "old -q BITS": ["-q", "8", "--q-group-size", "32", "--q-head-bits", "8"],
}
COMMANDS = {
    "generate": ["generate", "a corgi"],
    "inpaint": ["inpaint", IMAGE, MASK, "a bus"],
    "extend": ["extend", IMAGE, "a lake", "-d", "left"],
    "ask": ["ask", IMAGE, "what?"],
    "caption": ["caption", IMAGE],
    "complete": ["complete", "hello"],
    "convert": ["convert", REF / "showo", "OUT"],
    "bench": ["bench"],
}


class Captured(Exception):
    pass


@pytest.fixture
def capture_quantization(monkeypatch, tmp_path):
    """Where each command's quantization ends up: load_pipeline, convert(), or the bench options."""
    seen = []
    monkeypatch.setattr("showo_mlx.launcher.slow_blas_hint", lambda: None)  # bench's BLAS probe: not tested here

    def load(model, dtype, quantize, low_ram=False):
        seen.append(quantize)
        raise Captured

    def convert(src, dst, *, quantize, **kwargs):
        seen.append(quantize)
        raise Captured

    def run_bench(opts, log):
        seen.append(QuantizeSpec(opts.quantize, opts.group_size, opts.head_bits) if opts.quantize else None)
        raise Captured

    monkeypatch.setattr(cli_module, "load_pipeline", load)
    monkeypatch.setattr("showo_mlx.convert.convert", convert)
    monkeypatch.setattr(bench_module, "run_bench", run_bench)
    monkeypatch.chdir(tmp_path)

    def invoke(args):
        r = runner.invoke(app, [str(tmp_path / "out") if a == "OUT" else str(a) for a in args])
        assert isinstance(r.exception, Captured), (r.stdout, r.stderr, r.exception)
        return seen.pop(), r.stderr

    return invoke


@pytest.mark.parametrize("command", list(COMMANDS))
def test_quantize_forms_agree_across_commands(command, capture_quantization):
    want = QuantizeSpec(bits=8, group_size=32, head_bits=8)
    for form, flags in QUANTIZE_FORMS.items():
        spec, stderr = capture_quantization([*COMMANDS[command], *flags])
        assert spec == want, (command, form)
        assert ("deprecated" in stderr) == (form == "old -q BITS"), (command, form, stderr)
    assert capture_quantization([*COMMANDS[command], "-q"])[0] == QuantizeSpec(4, 64, None)
    assert capture_quantization(COMMANDS[command])[0] is None


def test_old_bench_spellings_still_work(capture_quantization):
    spec, stderr = capture_quantization(["bench", "--quantize", "4", "--group-size", "128", "--head-bits", "4"])
    assert spec == QuantizeSpec(4, 128, 4)
    assert stderr.count("deprecated") == 3


@pytest.mark.parametrize("command", ["generate", "ask", "convert", "bench"])
def test_quantize_details_need_the_switch(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(runner.invoke(app, [str(a) for a in COMMANDS[command]] + ["--q-bits", "8"]))
    assert "--q-bits needs -q/--quantize" in line


# -- conventions: -h, --version, usage, help, examples -------------------------------------------------
def subcommands():
    """The app and its commands by name; a group's commands (`showo eval vqa`) as "group sub"."""
    import typer.main

    group = typer.main.get_command(app)
    commands = {}
    for name in group.commands:
        command = group.get_command(None, name)
        if hasattr(command, "commands"):  # a group (typer vendors its own click: no isinstance)
            commands.update({f"{name} {sub}": command.get_command(None, sub) for sub in command.commands})
        else:
            commands[name] = command
    return group, commands


def test_version_and_short_help():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"showo-mlx {__version__}"
    assert "<bool>" not in runner.invoke(app, ["-h"]).stdout


def option_names(command, hidden: bool = True) -> set[str]:
    return {o for p in command.params if p.param_type_name == "option" and (hidden or not p.hidden)
            for o in [*p.opts, *p.secondary_opts]} | {"-h", "--help"}


def unknown_options(argv: list[str]) -> list[str]:
    """The option tokens of `showo …` argv that its command does not define (static, no help render)."""
    _, commands = subcommands()
    at = 2 if " ".join(argv[:2]) in commands else 1  # a group's command: `eval vqa ...`
    command = commands[" ".join(argv[:at])]
    words = argv[at:argv.index("--")] if "--" in argv else argv[at:]
    flags = [w.split("=", 1)[0] for w in words if w.startswith("-") and len(w) > 1 and not w[1:].isdigit()]
    return [f for f in flags if f not in option_names(command)]


def test_every_command_follows_the_help_conventions():
    _, commands = subcommands()
    assert {"generate", "inpaint", "extend", "ask", "caption", "complete", "convert", "reconstruct", "info",
            "prepare", "train", "fuse", "bench", "serve", "init", "eval vqa", "eval geneval"} <= set(commands)
    for name, command in commands.items():
        r = runner.invoke(app, [*name.split(), "-h"], terminal_width=200)
        assert r.exit_code == 0, (name, r.stderr)
        assert "<bool>" not in r.stdout  # switches show no type
        usage = next(line for line in r.stdout.splitlines() if "Usage:" in line)
        assert "{" not in usage and "<" not in usage, usage
        for p in command.params:
            if p.param_type_name == "argument":
                assert (p.metavar or p.name).upper() in usage, usage
        for p in command.params:
            if p.param_type_name != "option" or p.hidden:
                continue
            assert p.help, (name, p.opts)
            shown = p.show_default is not False and p.default is not None and p.default is not False
            alternative = "instead of" in p.help or "the same as" in p.help  # --image / --prompt for a positional
            assert shown or p.required or alternative or "default" in p.help.lower(), (name, p.opts, p.help)
        names = option_names(command, hidden=False)
        assert {"--verbose", "-v", "--quiet"} <= names, name
        assert "-m" not in names or name in ("ask", "caption", "complete"), name  # -m is --max-tokens only
        assert command.epilog and command.epilog.startswith("Examples:"), name
        examples = [shlex.split(line.strip()) for line in command.epilog.splitlines() if line.strip().startswith("showo ")]
        assert len(examples) >= 2, name
        for example in examples:
            at = 3 if " ".join(example[1:3]) in commands else 2  # `showo eval vqa ...`
            assert " ".join(example[1:at]) in commands and not unknown_options(example[1:]), example
    assert unknown_options(["generate", "x", "--no-such-flag"]) == ["--no-such-flag"]  # the check can fail


# -- item 6: notes on stderr, --verbose and --quiet ------------------------------------------------------
def test_library_notes_reach_stderr_and_quiet_silences_them(converted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Image.open(WIDE) as im:
        rgba = im.convert("RGBA")
    rgba.save(tmp_path / "wide.png")
    args = ["ask", tmp_path / "wide.png", "What is it?", "-m", "4", "--model", converted]
    verbose = runner.invoke(app, [str(a) for a in args] + ["-v"])
    assert verbose.exit_code == 0, verbose.stderr
    notes = [line for line in verbose.stderr.splitlines() if line.startswith("note: ")]
    assert any("wide.png: alpha channel dropped" in n for n in notes), verbose.stderr
    assert any("image 300x200 centre-cropped to a square and resized to 128x128" in n for n in notes), verbose.stderr
    assert f"debug: model {converted.resolve()} from {converted}" in verbose.stderr  # -v: the debug lines too
    assert "Generation: " in verbose.stderr
    quiet = runner.invoke(app, [str(a) for a in args] + ["--quiet"])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == verbose.stdout
    both = runner.invoke(app, [str(a) for a in args] + ["--quiet", "-v"])
    assert "contradict" in one_line_error(both)


# -- issue 16 item 13: outputs checked before the model loads --------------------------------------------
@pytest.mark.parametrize("output,needle", [
    ("/proc/showo-test.png", "cannot create files in /proc"),
    ("/sys/showo-test.png", "cannot create files in /sys"),
    ("a_folder", "must end in .png"),
    ("a_folder.png", "is a folder"),
    ("a_file/x.png", "a_file"),
    ("x" * 250 + ".png", "too long"),
])
def test_unwritable_outputs_are_refused_before_loading(output, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_folder.png").mkdir()
    (tmp_path / "a_file").write_text("in the way")
    monkeypatch.setattr(cli_module, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    for command in (["generate", "a corgi", "-o", output], ["inpaint", IMAGE, MASK, "a bus", "-o", output, "--force"]):
        line = one_line_error(runner.invoke(app, [str(a) for a in command]))
        assert needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder.png"]
