"""`showo doctor` and the automatic attention choice it feeds.

* `showo doctor --quick --json out.json` runs here (sdpa and blockwise; metal reported unavailable
  with its reason), its parity section covers >= 50 layouts of every kind in every dtype and passes,
  and the report is cached where `SHOWO_ATTENTION=auto` reads it;
* the automatic choice takes the Metal kernel only with a cached full report that proves it exact
  and faster on this device and these versions; a verified-slower, verified-wrong, failed, quick,
  stale or missing report means SDPA (checked as if Metal were usable here).
"""

from __future__ import annotations

import copy
import json

import mlx.core as mx
import pytest
from typer.testing import CliRunner

import showo_mlx.kernels as kernels
from showo_mlx.cli import app
from showo_mlx.doctor import CASE_KINDS, DTYPES
from showo_mlx.fsutil import atomic_write_bytes
from showo_mlx.kernels.auto import TOLERANCES, cache_key, load_report, report_path

runner = CliRunner()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOWO_MLX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SHOWO_ATTENTION", raising=False)
    return tmp_path / "cache"


def test_doctor_quick_runs_and_caches(cache, tmp_path):
    out = tmp_path / "out.json"
    result = runner.invoke(app, ["doctor", "--quick", "--json", str(out)])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(out.read_text())
    assert report["key"] == cache_key() and report["system"]["mlx"] == mx.__version__ and report["quick"]
    metal = report["backends"]["metal"]
    if not mx.metal.is_available():
        assert not metal["available"] and "Metal" in metal["reason"]
        assert report["parity"]["results"]["metal"] == {"unavailable": metal["reason"]}
        assert "blas" in report["system"]  # Linux: which BLAS MLX computes with

    parity = report["parity"]
    assert parity["cases"] >= 50 and set(parity["kinds"]) == set(CASE_KINDS) and min(parity["kinds"].values()) >= 5
    for backend in ("sdpa", "blockwise"):
        for dtype in DTYPES:
            entry = parity["results"][backend][dtype]
            assert entry["cases"] == parity["cases"] and entry["pass"], (backend, dtype, entry)
            assert 0 < entry["max_rel_error"] <= TOLERANCES[dtype]

    shapes = {s["name"]: s for s in report["timing"]["shapes"]}
    hot = shapes["hot loop 256 px"]
    assert (hot["kind"], hot["batch"], hot["q_len"], hot["k_len"]) == ("hot", 2, 258, 387)
    assert 0.5 < hot["metal_tile_density"] < 1
    assert all(s["ms"]["float32"]["sdpa"] > 0 and s["ms"]["float32"]["blockwise"] > 0 for s in shapes.values())
    assert {s["kind"] for s in shapes.values()} == {"hot", "prefill"}

    # Cached for the automatic choice, which (without a verified Metal kernel) is SDPA throughout.
    assert load_report() == report and report_path().parent == cache / "doctor"
    picks = {c["backend"] for per_kind in report["choice"].values() for c in per_kind.values()}
    assert picks == {"sdpa"}  # a --quick report never enables the kernel
    assert "parity" in result.stdout and "SHOWO_ATTENTION=auto" in result.stdout

    again = runner.invoke(app, ["doctor", "--quick", "--json", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr and "Traceback" not in again.output


# -- the automatic choice -------------------------------------------------------------------------
def verified_report(metal_error: float = 1e-7, sdpa_ms: float = 2.0, metal_ms: float = 1.0, **extra) -> dict:
    """A doctor report as a full run on this device would write it, with chosen Metal numbers."""
    results = {
        "sdpa": {d: {"max_rel_error": 1e-7, "pass": True} for d in DTYPES},
        "metal": {d: {"max_rel_error": metal_error, "pass": metal_error <= TOLERANCES[d]} for d in DTYPES},
    }
    shapes = [
        {"name": name, "kind": kind, "ms": {d: {"sdpa": sdpa_ms, "metal": metal_ms} for d in DTYPES}}
        for name, kind in [("hot loop 256 px", "hot"), ("hot loop 512 px", "hot"), ("prefill", "prefill")]
    ]
    report = {"schema": 1, "key": cache_key(), "quick": False, "parity": {"results": results}, "timing": {"shapes": shapes}}
    report.update(extra)
    return report


def write(report: dict) -> None:
    atomic_write_bytes(report_path(), json.dumps(report).encode())


@pytest.fixture
def gpu_ready(monkeypatch):
    """Pretend the Metal GPU is MLX's default device (the choice logic is what is under test)."""
    monkeypatch.setattr(kernels, "metal_unavailable_reason", lambda: None)


def choice(dtype=mx.float32, kind="hot", head_dim=64) -> str:
    q = mx.zeros((2, 2, 8, head_dim), dtype=dtype)
    return kernels.select_attention_backend(q, q, q, kind=kind)


def test_auto_falls_back_to_sdpa_without_metal(cache, monkeypatch):
    """Even a report that verifies the kernel is not used where it cannot run (here on Linux: no
    Metal; anywhere: the CPU as default device)."""
    write(verified_report())
    if not mx.metal.is_available():
        assert kernels.metal_unavailable_reason() is not None and choice() == "sdpa"
    monkeypatch.setattr(kernels, "metal_unavailable_reason", lambda: "MLX's default device is the CPU")
    assert choice() == "sdpa" and choice(mx.float16, "prefill") == "sdpa"


def test_auto_uses_metal_only_when_verified(cache, gpu_ready):
    assert choice() == "sdpa"  # nothing verified yet
    write(verified_report())
    assert choice() == "metal" and choice(mx.float16, "prefill") == "metal"
    assert choice(head_dim=16) == "sdpa"  # shapes the kernel does not handle

    write(verified_report(sdpa_ms=1.0, metal_ms=1.2))  # verified slower
    assert choice() == "sdpa" and choice(kind="prefill") == "sdpa"
    write(verified_report(sdpa_ms=1.0, metal_ms=0.99))  # within noise: not worth it
    assert choice() == "sdpa"

    write(verified_report(metal_error=1e-3))  # verified wrong in float32, fine for float16
    assert choice(mx.float32) == "sdpa" and choice(mx.float16) == "metal"
    write(verified_report(metal_error=float("nan")))
    assert choice(mx.float16) == "sdpa" and choice(mx.bfloat16) == "sdpa"


def test_auto_ignores_unusable_reports(cache, gpu_ready):
    good = verified_report()
    failed = copy.deepcopy(good)
    failed["parity"]["results"]["metal"] = {"error": "RuntimeError: compile failed"}
    stale = verified_report(key={**cache_key(), "mlx": "0.0.1"})
    slower_prefill = copy.deepcopy(good)
    for shape in slower_prefill["timing"]["shapes"]:
        if shape["kind"] == "prefill":
            shape["ms"]["float32"]["metal"] = 5.0
    for report, want_hot, want_prefill in [
        (verified_report(quick=True), "sdpa", "sdpa"),
        (failed, "sdpa", "sdpa"),
        (stale, "sdpa", "sdpa"),
        (slower_prefill, "metal", "sdpa"),
    ]:
        write(report)
        assert (choice(kind="hot"), choice(kind="prefill")) == (want_hot, want_prefill)
    report_path().write_text("{not json")
    assert choice() == "sdpa"


def test_memory_limits_report_mlx_limits():
    """What `showo doctor` prints on macOS (device memory facts there); MLX's own limits anywhere."""
    from showo_mlx.doctor import memory_limits

    limits = memory_limits()
    assert limits["mlx_active_memory"] >= 0
    if hasattr(mx, "get_memory_limit"):
        assert limits["mlx_memory_limit"] == mx.get_memory_limit() > 0
    if mx.metal.is_available():
        assert any("memory" in key for key in limits if key.startswith(("memory", "max", "total")))
