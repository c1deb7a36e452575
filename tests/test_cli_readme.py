"""The README's command lines work as written (issue 11 acceptance): every `showo …` line of its
code blocks and inline code parses with `--help` (so every flag shown exists), every option it
names exists, and the main lines run for real on the fixture model, in the README's order (so
`showo info image.png` reads the image the line before it wrote)."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REF
from showo_mlx.cli import app
from showo_mlx.cli_args import RENAMED
from showo_mlx.metadata import read_record

README = Path(__file__).resolve().parents[1] / "README.md"
runner = CliRunner()
FIXTURE_ARGS = ["--vq", str(REF / "magvitv2"), "--tokenizer", str(REF / "tokenizer")]
# the Linux launcher's (removed from argv before typer parses it), and the old bench spellings
NOT_SHOWO_OPTIONS = {"--openblas", *RENAMED}
RUN_FOR_REAL = [shlex.split(line) for line in (  # README lines run on the fixture model (the others: --help)
    'generate "a rally car race" "a lighthouse at dusk" --seed 1 2 -o "out/{i}_{seed}.png"',
    'generate "a corgi" --greedy',
    "info image.png",
    "generate --config-from-metadata image.png --seed 7",
    'ask photo.png "What is in this image?"',
    'complete "Once upon a time" --max-tokens 60',
    "convert showlab/show-o ./show-o-mlx",
)]


def showo_argv(command: str) -> list[str] | None:
    """`… showo ARGS` (or `… python -m showo_mlx.cli ARGS`) → ARGS; None if it runs something else."""
    for part in command.split("&&"):
        words = shlex.split(part, comments=True)
        for i, word in enumerate(words):
            if word == "showo" or word.endswith("/showo"):
                return words[i + 1:]
            if word == "showo_mlx.cli" and i and words[i - 1] == "-m":
                return words[i + 1:]
    return None


def readme_commands() -> list[list[str]]:
    text = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    # a trailing backslash continues a shell command on the next line
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    inline = [span for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
              if span.startswith("showo ")]
    commands = [argv for argv in map(showo_argv, lines + inline) if argv]
    assert len(commands) > 25
    return commands


def option_names() -> set[str]:
    import typer.main

    group = typer.main.get_command(app)
    params = [*group.params] + [p for name in group.commands for p in group.get_command(None, name).params]
    return {o for p in params if p.param_type_name == "option" and not p.hidden for o in [*p.opts, *p.secondary_opts]}


def test_every_readme_command_parses():
    ran = 0
    for argv in readme_commands():
        if any(word in ("…", "COMMAND") for word in argv) or argv[:1] == ["--openblas"]:
            continue  # prose placeholders (`showo COMMAND -h`); the launcher flag is tested in test_bench
        if argv == ["--version"]:
            assert runner.invoke(app, argv).exit_code == 0
            continue
        at = argv.index("--") if "--" in argv else len(argv)  # after `--` everything is positional
        r = runner.invoke(app, [*argv[:at], "--help", *argv[at:]])
        assert r.exit_code == 0 and "Usage:" in r.stdout, (argv, r.stdout, r.stderr)
        ran += 1
    assert ran > 25


def test_every_option_the_readme_names_exists():
    text = README.read_text()
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    spans += [line for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S) for line in block.replace("\\\n", " ").splitlines()]
    named = set()
    for span in spans:
        if span.split()[:1] in (["pip"], ["pytest"], ["sudo"], ["bash"], ["apt-get"], ["curl"]) or "pytest" in span or "apt-get" in span:
            continue  # other tools' options
        named.update(w.split("=")[0] for w in re.findall(r"(?<![\w-])--?[a-z][\w-]*(?:=\S+)?", span))
    named -= {"--hostfile", "--backend"}  # mlx.launch's, on the several-Macs line
    assert {"--temp", "--prompt", "-p", "--image", "--mask", "-m", "-q", "--q-bits", "--quiet", "-v"} <= named
    unknown = sorted(named - option_names() - NOT_SHOWO_OPTIONS - {"-h"})
    assert not unknown, unknown


def test_the_main_readme_commands_run_on_the_fixture_model(converted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(REF / "images" / "preprocess_in_0.png", tmp_path / "photo.png")
    shutil.copy(REF / "images" / "inpaint_mask.png", tmp_path / "mask.png")
    commands = readme_commands()
    assert all(argv in commands for argv in RUN_FOR_REAL), [argv for argv in RUN_FOR_REAL if argv not in commands]
    outputs = {}
    for argv in sorted(RUN_FOR_REAL, key=commands.index):  # the README's order
        line, argv = " ".join(argv), list(argv)
        if argv[0] == "convert":
            argv = [argv[0], str(REF / "showo"), *argv[2:], *FIXTURE_ARGS]
        elif argv[0] in ("generate", "ask", "complete") and "--config-from-metadata" not in argv:
            # the fixture model, and fewer steps/tokens than the defaults: the lines' own flags still apply
            argv += ["--model", str(converted), *(["--steps", "2"] if argv[0] == "generate" else ["-m", "10"])]
        r = runner.invoke(app, argv)
        assert r.exit_code == 0, (line, r.stdout, r.stderr, r.exception)
        outputs[argv[0] if argv[0] != "generate" else line] = r
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0_1.png", "1_2.png", "2_1.png", "3_2.png"]
    assert [read_record(tmp_path / "out" / f)["prompt"] for f in ("0_1.png", "2_1.png")] == ["a rally car race", "a lighthouse at dusk"]
    greedy, again = read_record(tmp_path / "image.png"), read_record(tmp_path / "image_1.png")
    assert greedy["greedy"] and greedy["prompt"] == "a corgi" and "prompt: a corgi" in outputs["info"].stdout
    assert again == {**greedy, "seed": 7}  # --config-from-metadata kept every setting but the seed
    assert outputs["ask"].stdout.strip() and "Generation: " in outputs["ask"].stderr
    # without --quiet/-v: the library's notes, and no debug lines
    assert "note: image 300x200 centre-cropped to a square and resized to 128x128" in outputs["ask"].stderr
    assert "debug:" not in outputs["ask"].stderr
    assert outputs["complete"].stdout.startswith("Once upon a time")
    assert (tmp_path / "show-o-mlx" / "config.json").exists()
