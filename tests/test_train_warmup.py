"""A warm-up the user did not choose (preset or default) fits short runs: the `lora` preset's 100
warm-up steps no longer refuse `max_steps: 6`; the command says what it changed."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from showo_mlx.errors import TrainingConfigError
from showo_mlx.train.config import TrainConfig


def test_lora_preset_with_a_short_run(tmp_path):
    path = tmp_path / "lora.yaml"
    path.write_text("preset: lora\nmax_steps: 6\n")  # the TRAINING.md example, shortened
    cfg = TrainConfig.load(path)
    assert cfg.warmup_steps == 0 and cfg.max_steps == 6
    [note] = cfg.notes
    assert "lora preset's 100" in note and "using 0" in note
    assert TrainConfig.load(None, sets=["max_steps=50"]).warmup_steps == 5  # the default 100, too
    long = TrainConfig.load(path, sets=["max_steps=2000"])
    assert long.warmup_steps == 100 and long.notes == []  # the preset's own run length: unchanged


def test_a_warmup_the_user_chose_is_kept_or_refused(tmp_path):
    assert TrainConfig.load(None, sets=["max_steps=6", "warmup_steps=5"]).warmup_steps == 5
    with pytest.raises(TrainingConfigError, match=r"warmup_steps \(100\) must be in \[0, max_steps=6\)"):
        TrainConfig.load(None, sets=["preset=lora", "max_steps=6", "warmup_steps=100"])


def test_train_command_prints_the_note(tmp_path, monkeypatch):
    """`showo train` says what it adjusted before training (the Trainer is replaced by a recorder:
    the training itself is covered by test_train_cli.py)."""
    from showo_mlx.cli import app
    from showo_mlx.train import trainer

    seen = {}

    class Recorder:
        def __init__(self, cfg, resume=False, force=False, log=None):
            seen["cfg"] = cfg
            raise KeyboardInterrupt  # stop before any work; the CLI maps it to exit 130

    monkeypatch.setattr(trainer, "Trainer", Recorder)
    path = tmp_path / "lora.yaml"
    path.write_text("preset: lora\nmax_steps: 6\n")
    r = CliRunner().invoke(app, ["train", str(path)])
    assert r.exit_code == 130 and seen["cfg"].warmup_steps == 0
    assert "note: warmup_steps: the lora preset's 100 is more than 10% of max_steps 6; using 0" in r.stderr
