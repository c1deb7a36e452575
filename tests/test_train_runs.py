"""A run folder belongs to one run; NaN/Inf never reaches a checkpoint; a torn log line does not
block --resume; status.json says how every run ended."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from test_train_inputs import write_prepared
from typer.testing import CliRunner

from showo_mlx.cli import app
from showo_mlx.errors import TrainingConfigError, TrainingDivergedError
from showo_mlx.train import runfolder
from showo_mlx.train.config import TrainConfig
from showo_mlx.train.trainer import Trainer

QUIET = lambda m: None  # noqa: E731


@pytest.fixture(scope="module")
def fast(converted, tmp_path_factory):
    """The tiny model and four prepared t2i rows written directly (no MAGVIT encoding)."""
    root = tmp_path_factory.mktemp("runs")
    return {"model": str(converted), "data": str(write_prepared(root / "prep")), "root": root}


def _cfg(fast, out: Path, **kw) -> TrainConfig:
    base = dict(model=fast["model"], data=fast["data"], output=str(out), batch_t2i=1, batch_lm=0, batch_mmu=0,
                max_steps=4, warmup_steps=0, lr=1e-3, save_every=2, progress=False, log_every=1000,
                max_seq_length=8)  # short rows (75 tokens): these tests are about the run, not the model
    base.update(kw)
    return TrainConfig.from_dict(base)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _state(ck: Path) -> dict:
    return json.loads((ck / "state.json").read_text())


# -- item 2: one run per folder ---------------------------------------------------------------------
def test_a_second_run_is_refused_and_resume_keeps_to_its_own_run(fast, tmp_path):
    run, other = tmp_path / "run", tmp_path / "other"
    Trainer(_cfg(fast, run, max_steps=2, save_every=1), log=QUIET).run()  # run A: checkpoints 1 and 2
    run_a = runfolder.read_run_id(run)
    assert run_a and {_state(p)["run_id"] for p in (run / "checkpoints").iterdir()} == {run_a}
    assert [r["run_id"] for r in _log(run)] == [run_a] * 2
    before = _files(run)

    # run B into the same folder without --resume/--force: refused before anything is touched
    with pytest.raises(TrainingConfigError, match=f"already holds run {run_a}; pass --resume"):
        Trainer(_cfg(fast, run, max_steps=3), log=QUIET)
    config = tmp_path / "b.yaml"
    config.write_text(json.dumps(dict(model=fast["model"], data=fast["data"], output=str(run), batch_lm=0, batch_mmu=0,
                                      max_steps=3, warmup_steps=0)))
    r = CliRunner().invoke(app, ["train", str(config)])
    assert r.exit_code == 2 and "already holds run" in r.output, r.output
    assert _files(run) == before

    # the mix: another run's newer checkpoint in this folder; --resume must not take it
    Trainer(_cfg(fast, other, max_steps=3, save_every=3), log=QUIET).run()
    run_b = runfolder.read_run_id(other)
    shutil.copytree(other / "checkpoints" / "step-00000003", run / "checkpoints" / "step-00000003")
    mixed = _files(run)
    with pytest.raises(TrainingConfigError, match=f"step-00000003 in .* belongs to run {run_b}, not to this folder's run {run_a}"):
        Trainer(_cfg(fast, run, max_steps=4), resume=True, log=QUIET)
    assert _files(run) == mixed

    # moved away, the folder's own run resumes from its step 2 and keeps its id everywhere
    shutil.rmtree(run / "checkpoints" / "step-00000003")
    resumed = Trainer(_cfg(fast, run, max_steps=3, save_every=1), resume=True, log=QUIET)
    assert resumed.start_step == 2 and resumed.run_id == run_a
    resumed.run()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert {_state(p)["run_id"] for p in (run / "checkpoints").iterdir()} == {run_a}
    assert [r["run_id"] for r in _log(run)] == [run_a] * 3 and [r["step"] for r in _log(run)] == [1, 2, 3]

    # another run's checkpoint is never pruned by this run
    shutil.copytree(other / "checkpoints" / "step-00000003", run / "checkpoints" / "step-00000001")
    Trainer(_cfg(fast, run, max_steps=4, save_every=1), resume=True, log=QUIET).run()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001", "step-00000003", "step-00000004"]
    shutil.rmtree(run / "checkpoints" / "step-00000001")

    # --force starts over, but only in a folder holding nothing but a run's files
    (run / "notes.txt").write_text("mine")
    with pytest.raises(TrainingConfigError, match="also holds 'notes.txt'"):
        Trainer(_cfg(fast, run), force=True, log=QUIET)
    (run / "notes.txt").unlink()
    Trainer(_cfg(fast, run, max_steps=1, save_every=1), force=True, log=QUIET).run()
    run_c = runfolder.read_run_id(run)
    assert run_c not in (run_a, run_b)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]
    assert [r["run_id"] for r in _log(run)] == [run_c]


def test_a_folder_in_use_is_refused(fast, tmp_path):
    run = tmp_path / "busy"
    trainer = Trainer(_cfg(fast, run, max_steps=1), log=QUIET)
    with runfolder.locked(run):  # another `showo train` holding the folder
        with pytest.raises(TrainingConfigError, match="another `showo train` is running in"):
            trainer.run()
    trainer.run()  # free again
    assert runfolder.read_status(run)["status"] == "completed"


# -- item 3: non-finite values ----------------------------------------------------------------------
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(fast, tmp_path):
    run = tmp_path / "nan"
    trainer = Trainer(_cfg(fast, run, max_steps=8, save_every=1, max_nonfinite_steps=2), log=QUIET)
    poisoned = {1, 4, 5}  # step indices whose gradient gets a NaN (e.g. one bad row)
    gradients = trainer.gradients

    def with_nan(step):
        grads, sums, counts, tokens = gradients(step)
        if step in poisoned:
            grads = tree_map(lambda g: g * float("nan"), grads)
        return grads, sums, counts, tokens

    trainer.gradients = with_nan
    params, moments = [], []
    trainer.callback = lambda rec: (params.append({k: np.array(v) for k, v in tree_flatten(trainer.params)}),
                                    moments.append({k: np.array(v) for k, v in tree_flatten(trainer.optimizer.state)}))
    with pytest.raises(TrainingDivergedError, match="2 steps in a row .to step 6. had non-finite"):
        trainer.run()
    assert [r["skipped"] for r in _log(run)] == [False, True, False, False, True, True]
    for a, b in ((0, 1), (3, 4)):  # a skipped step changes neither the weights nor AdamW's state
        assert all(np.array_equal(params[a][k], params[b][k]) for k in params[a])
        assert all(np.array_equal(moments[a][k], moments[b][k]) for k in moments[a])
    assert not all(np.array_equal(params[1][k], params[2][k]) for k in params[1])  # and training went on
    assert all(np.isfinite(v).all() for p in params for v in p.values())
    # stopped at step 6 before saving it; the last good checkpoints are there and finite
    cks = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert cks == ["step-00000004", "step-00000005"]
    w = mx.load(str(run / "checkpoints" / "step-00000005" / "trainable.safetensors"))
    assert all(bool(mx.isfinite(v).all()) for v in w.values()) and _state(run / "checkpoints" / "step-00000005")["skipped_steps"] == 2
    status = runfolder.read_status(run)
    assert (status["status"], status["exit_code"], status["step"], status["skipped_steps"]) == ("failed", 3, 6, 3)


def test_cli_exits_3_on_diverged_weights_and_keeps_the_good_checkpoints(fast, tmp_path):
    run = tmp_path / "diverge"
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(dict(model=fast["model"], data=fast["data"], output=str(run), batch_t2i=1, batch_lm=0,
                                      batch_mmu=0, max_steps=2, warmup_steps=0, lr=1e-3, save_every=1, progress=False,
                                      max_seq_length=8)))
    runner = CliRunner()
    r = runner.invoke(app, ["train", str(config)])
    assert r.exit_code == 0, r.output
    good, result = _files(run / "checkpoints"), _files(run / "model")
    assert sorted({k.split("/")[0] for k in good}) == ["step-00000001", "step-00000002"]
    # lr 1e39 is inf in float32: step 3's update turns the weights into Inf/NaN
    r = runner.invoke(app, ["train", str(config), "--resume", "--set", "lr=1e39", "--set", "max_steps=8"])
    assert r.exit_code == 3, (r.output, r.exception)
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "holds NaN or Inf values, so no checkpoint was written" in errors[0], r.output
    assert _files(run / "checkpoints") == good  # neither replaced nor pruned
    status = runfolder.read_status(run)
    assert (status["status"], status["exit_code"], status["step"]) == ("failed", 3, 3)
    # and with saves further apart, the NaN losses that follow stop it after max_nonfinite_steps
    r = runner.invoke(app, ["train", str(config), "--resume", "--set", "lr=1e39", "--set", "max_steps=8",
                            "--set", "save_every=100", "--set", "max_nonfinite_steps=2"])
    assert r.exit_code == 3 and "2 steps in a row (to step 5) had non-finite" in r.output, r.output
    assert _files(run / "checkpoints") == good and _files(run / "model") == result


# -- item 5: a torn last log line ----------------------------------------------------------------------
def test_resume_trims_a_partial_last_log_line(fast, tmp_path):
    run = tmp_path / "torn"
    straight = Trainer(_cfg(fast, tmp_path / "straight", max_steps=3), log=QUIET)
    straight.run()
    with pytest.raises(_Stop):
        Trainer(_cfg(fast, run, max_steps=3, save_every=2), callback=_stop_after(2), log=QUIET).run()
    with open(run / "log.jsonl", "ab") as f:  # power loss in the middle of writing step 3's line
        f.write(b'{"step": 3, "loss": 5.81, "loss_t2i"')
    lines: list[str] = []
    resumed = Trainer(_cfg(fast, run, max_steps=3, save_every=2), resume=True, log=lines.append)
    assert any("dropped 1 unreadable line(s)" in line for line in lines)
    resumed.run()
    log = _log(run)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert [r["loss"] for r in log] == [r["loss"] for r in _log(tmp_path / "straight")]  # exact, as if never cut


class _Stop(KeyboardInterrupt):
    pass


def _stop_after(step: int):
    """A callback that interrupts the run after `step` (like Ctrl-C there)."""

    def callback(rec):
        if rec.step == step:
            raise _Stop

    return callback


# -- status.json ---------------------------------------------------------------------------------------
def test_status_json_says_how_the_run_ended(fast, tmp_path):
    run = tmp_path / "status"
    with pytest.raises(_Stop):
        Trainer(_cfg(fast, run, max_steps=3, save_every=1), callback=_stop_after(2), log=QUIET).run()
    status = runfolder.read_status(run)
    assert (status["status"], status["exit_code"], status["step"]) == ("interrupted", 130, 2)
    assert status["run_id"] == runfolder.read_run_id(run) and status["checkpoint"].endswith("step-00000002")
    Trainer(_cfg(fast, run, max_steps=3, save_every=1), resume=True, log=QUIET).run()
    status = runfolder.read_status(run)
    assert (status["status"], status["exit_code"], status["step"], status["max_steps"]) == ("completed", 0, 3, 3)
    assert status["output"].endswith("model") and not list(run.glob(".status.json.tmp-*"))


def test_sigterm_stops_showo_train_with_status_interrupted(fast, tmp_path):
    import os
    import signal
    import threading
    import time

    run = tmp_path / "term"
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(dict(model=fast["model"], data=fast["data"], output=str(run), batch_t2i=1, batch_lm=0,
                                      batch_mmu=0, max_steps=200, warmup_steps=0, save_every=1, progress=False,
                                      max_seq_length=8)))

    def terminate_once_training():  # the log exists only inside the run, where the handler is installed
        deadline = time.monotonic() + 60
        while not (run / "log.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_training, daemon=True)
    killer.start()
    r = CliRunner().invoke(app, ["train", str(config)])
    killer.join()
    assert r.exit_code == 143 and "terminated; the last checkpoint is kept" in r.output, (r.output, r.exception)
    status = runfolder.read_status(run)
    assert (status["status"], status["exit_code"], status["message"]) == ("interrupted", 143, "terminated by SIGTERM")
    assert 1 <= status["step"] < 200 and (status["checkpoint"] is None or Path(status["checkpoint"]).is_dir())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI put the default back
