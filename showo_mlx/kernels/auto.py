"""The automatic attention choice: SDPA unless `showo doctor` proved the Metal kernel on this machine.

`showo doctor` (showo_mlx/doctor.py) measures every backend's error against a float64 reference and
its time on Show-o's shapes, and caches the report per (device, MLX version, showo-mlx version) in
`<cache>/doctor/` (`$SHOWO_MLX_CACHE` or ~/.cache/showo-mlx). With `SHOWO_ATTENTION` unset or `auto`,
the Metal kernel is used for a dtype and a kind of call only when that report, made by a full (not
`--quick`) run on this very device and these versions, says the kernel is

- exact: max |out − ref| / max |ref| within TOLERANCES[dtype] over every parity layout, and
- faster: at least MIN_SPEEDUP × faster than SDPA on every timed shape of that kind
  ("hot" = the MaskGIT loop, every query of a row sees the same keys; "prefill" = rows differ).

Anything else (no report, a stale or unreadable one, a failed or slower kernel) means SDPA.
"""

from __future__ import annotations

import json
import math
import platform
import re
from pathlib import Path

import mlx.core as mx

SCHEMA = 1
TOLERANCES = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}  # relative: max |Δ| / max |ref|
MIN_SPEEDUP = 1.05  # below this the difference is within run-to-run noise
KINDS = ("hot", "prefill")


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def device_name() -> str:
    """The GPU's name where MLX has Metal (e.g. "Apple M2 Pro"), else "cpu-<machine>"."""
    if mx.metal.is_available():
        info_fn = getattr(mx, "device_info", None)  # MLX >= 0.30.4; mx.metal.device_info before
        try:
            info = info_fn(mx.gpu) if info_fn else mx.metal.device_info()
        except Exception:  # pragma: no cover - unusual builds
            info = {}
        return str(info.get("device_name", "apple-gpu"))
    return f"cpu-{platform.machine() or 'unknown'}"


def cache_key() -> dict[str, str]:
    from .. import __version__

    return {"device": device_name(), "mlx": mx.__version__, "showo_mlx": __version__}


def report_path(key: dict[str, str] | None = None) -> Path:
    from ..loading import cache_root

    key = key or cache_key()
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{key['device']}--mlx-{key['mlx']}--showo-mlx-{key['showo_mlx']}")
    return cache_root() / "doctor" / f"{slug.strip('-')}.json"


_loaded: dict[Path, tuple[tuple, dict | None]] = {}


def load_report(path: Path | None = None) -> dict | None:
    """The cached doctor report for this device and these versions, or None (re-read when the file
    changes; a report whose key does not match is ignored)."""
    key = cache_key()
    path = Path(path) if path is not None else report_path(key)
    try:
        st = path.stat()
    except OSError:
        return None
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)  # a rewrite (atomic: a new inode) is always seen
    cached = _loaded.get(path)
    if cached is None or cached[0] != stamp:
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            report = None
        if not isinstance(report, dict) or report.get("schema") != SCHEMA or report.get("key") != key:
            report = None
        _loaded[path] = cached = (stamp, report)
    return cached[1]


def metal_verdict(report: dict | None, dtype: str, kind: str) -> tuple[bool, str]:
    """(use the Metal kernel?, why) for calls of `kind` in `dtype`, from a doctor report."""
    if report is None:
        return False, "not verified on this machine (run `showo doctor`)"
    if report.get("quick"):
        return False, "only a --quick doctor run is cached (run `showo doctor`)"
    result = report.get("parity", {}).get("results", {}).get("metal", {})
    if "error" in result:
        return False, f"the kernel failed: {result['error']}"
    entry = result.get(dtype)
    if not entry:
        return False, f"no {dtype} parity result"
    err, tol = entry.get("max_rel_error"), TOLERANCES[dtype]
    if not isinstance(err, (int, float)) or not math.isfinite(err) or err > tol:
        return False, f"wrong: {dtype} error {err} > {tol}"
    timed = [
        shape for shape in report.get("timing", {}).get("shapes", [])
        if shape.get("kind") == kind and isinstance(shape.get("ms", {}).get(dtype), dict)
    ]  # fmt: skip
    ratios = []
    for shape in timed:
        ms = shape["ms"][dtype]
        if not all(isinstance(ms.get(b), (int, float)) and ms[b] > 0 for b in ("sdpa", "metal")):
            return False, f"{shape.get('name', kind)} not timed in {dtype}"
        ratios.append(ms["sdpa"] / ms["metal"])
    if not ratios:
        return False, f"no {kind} timing in {dtype}"
    if min(ratios) < MIN_SPEEDUP:
        return False, f"slower: SDPA / metal time {min(ratios):.2f}x on a {kind} shape (needs {MIN_SPEEDUP}x)"
    return True, f"verified: {dtype} error {err:.1e}, {min(ratios):.2f}x faster than SDPA on {kind} shapes"


def auto_backend(dtype: mx.Dtype, kind: str) -> str:
    """"metal" when the cached doctor report proves it for (dtype, kind) here, else "sdpa"."""
    name = dtype_name(dtype)
    if name not in TOLERANCES or kind not in KINDS:
        return "sdpa"
    use, _ = metal_verdict(load_report(), name, kind)
    return "metal" if use else "sdpa"

