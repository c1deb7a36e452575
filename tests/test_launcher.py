"""OpenBLAS on Linux by default: the `showo` re-exec (SHOWO_OPENBLAS=0 turns it off), the install
hint once per process and never for --help, and `showo_mlx.enable_openblas()` for the Python API.
The re-exec is observed through an injected execve (nothing is really re-executed)."""

from __future__ import annotations

import sys

import pytest

from showo_mlx import launcher


class Exec(Exception):
    pass


def recorder(calls):
    def execve(path, argv, env):
        calls.append((path, argv, env))
        raise Exec

    return execve


@pytest.fixture
def linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(launcher, "_hint_shown", False)  # a fresh process as far as the hint goes


@pytest.fixture
def with_lib(linux, monkeypatch, tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    monkeypatch.setattr(launcher, "find_openblas", lambda: str(lib))
    return str(lib)


@pytest.fixture
def without_lib(linux, monkeypatch):
    monkeypatch.setattr(launcher, "find_openblas", lambda: None)


def test_showo_uses_openblas_by_default_when_installed(with_lib):
    calls = []
    with pytest.raises(Exec):
        launcher.prepare_process(["showo", "generate", "a cat"], {"PATH": "/bin"}, execve=recorder(calls))
    [(_, argv, env)] = calls
    assert env["LD_PRELOAD"] == with_lib and env[launcher.ENV_DONE] == "1"
    assert "--openblas" not in argv


def test_showo_openblas_0_turns_it_off_and_help_never_reexecs(with_lib, capsys):
    calls = []
    launcher.prepare_process(["showo", "generate", "a cat"], {"SHOWO_OPENBLAS": "0"}, execve=recorder(calls))
    for argv in (["showo"], ["showo", "--help"], ["showo", "generate", "-h"], ["showo", "--version"]):
        launcher.prepare_process(list(argv), {}, execve=recorder(calls))
    assert not calls and capsys.readouterr().err == ""
    with pytest.raises(Exec):  # --openblas still forces it over SHOWO_OPENBLAS=0
        launcher.prepare_process(["showo", "--openblas", "ask"], {"SHOWO_OPENBLAS": "0"}, execve=recorder(calls))


def test_install_hint_once_per_process_and_not_for_help(without_lib, capsys):
    calls = []
    launcher.prepare_process(["showo", "--help"], {}, execve=recorder(calls))
    assert capsys.readouterr().err == ""
    launcher.prepare_process(["showo", "generate", "x"], {}, execve=recorder(calls))
    launcher.prepare_process(["showo", "ask", "a.png", "q"], {}, execve=recorder(calls))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and launcher.INSTALL_HINT in err[0] and "SHOWO_OPENBLAS=0" in err[0]
    assert not calls
    launcher.blas_hint_once(environ={})  # load() after the CLI said it: silent
    assert capsys.readouterr().err == ""


def test_enable_openblas_reexecs_only_when_called(with_lib, monkeypatch):
    monkeypatch.setattr(launcher, "openblas_loaded", lambda: False)
    monkeypatch.setattr(launcher, "_interactive", lambda: False)
    calls = []
    with pytest.raises(Exec):
        launcher.enable_openblas(environ={"SHOWO_OPENBLAS": "0"}, execve=recorder(calls))  # explicit beats the env
    assert calls[0][2]["LD_PRELOAD"] == with_lib and calls[0][1][0] == sys.executable
    monkeypatch.setattr(launcher, "openblas_loaded", lambda: True)  # the re-executed process
    assert launcher.enable_openblas(environ=calls[0][2], execve=recorder(calls)) is True
    assert len(calls) == 1


def test_enable_openblas_never_restarts_an_interactive_session(with_lib, monkeypatch):
    monkeypatch.setattr(launcher, "openblas_loaded", lambda: False)
    monkeypatch.setattr(launcher, "_interactive", lambda: True)
    said, calls = [], []
    assert launcher.enable_openblas(environ={}, execve=recorder(calls), log=said.append) is False
    assert not calls and f"LD_PRELOAD={with_lib}" in said[0]


def test_enable_openblas_without_the_library_or_off_linux(without_lib, monkeypatch):
    monkeypatch.setattr(launcher, "openblas_loaded", lambda: False)
    said, calls = [], []
    assert launcher.enable_openblas(environ={}, execve=recorder(calls), log=said.append) is False
    assert len(said) == 1 and launcher.INSTALL_HINT in said[0] and not calls
    monkeypatch.setattr(sys, "platform", "darwin")
    assert launcher.enable_openblas(environ={}, execve=recorder(calls), log=said.append) is False
    assert len(said) == 1


def test_load_hints_once_when_the_slow_blas_is_in_use(with_lib, monkeypatch, converted):
    import showo_mlx

    monkeypatch.setattr(launcher, "openblas_loaded", lambda: False)
    monkeypatch.delenv("SHOWO_OPENBLAS", raising=False)
    logs: list[str] = []
    showo_mlx.load(converted, log=logs.append)
    showo_mlx.load(converted, log=logs.append)
    hints = [m for m in logs if "enable_openblas()" in m]
    assert len(hints) == 1 and "reference BLAS" in hints[0]
    monkeypatch.setattr(launcher, "_hint_shown", False)
    monkeypatch.setenv("SHOWO_OPENBLAS", "0")  # the user chose the bundled BLAS: no hint
    logs.clear()
    showo_mlx.load(converted, log=logs.append)
    assert not [m for m in logs if "BLAS" in m]
