"""`showo doctor`: is attention exact and fast on this machine, and which backend will be used.

One run (well under a minute on Apple silicon; `--quick` for a smaller timing pass):

1. the machine: showo-mlx / MLX versions, default device, Metal availability (and why not), the
   BLAS on Linux (MLX's wheel bundles a slow one; see launcher.py), the memory limits on macOS;
2. parity: every attention backend (sdpa, blockwise, metal) against a float64 NumPy softmax on
   PARITY_CASES random layouts of every kind Show-o builds (t2i CFG pairs with and without the cached
   text prefix, mmu, mmu-vit, lm with and without a cache, mixed batches, one-query decode steps,
   odd query/key ranges), in float32, float16 and bfloat16; the error is max |out − ref| / max |ref|;
3. timing on Show-o's real shapes (CFG pair, 32 heads of 64): the MaskGIT hot loop at 256 and
   512 px (image queries over the cached text prefix) and prefills where query rows differ; each
   backend is timed as the model runs it (SDPA with its mask built once, the kernels with their plan
   built once), best of a few warm runs;
4. the choice `SHOWO_ATTENTION=auto` (the default) makes from this report (kernels/auto.py): the
   Metal kernel only where it is exact and faster, SDPA everywhere else.

The report is cached per (device, MLX version, showo-mlx version) under `<cache>/doctor/`, where
the automatic choice reads it; `--json FILE` also writes it where you want (attach it to an issue).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from .attention import attention_mask
from .kernels import blockwise_attention_with_plan, make_block_plan, masked_sdpa
from .kernels import metal_attention
from .kernels.auto import KINDS, SCHEMA, TOLERANCES, cache_key, device_name, metal_verdict, report_path
from .kernels.blockwise import blockwise_attention
from .layout import Layout, batch_allowed, causal_layout, mmu_layout, mmu_vit_layout, t2i_layout

BACKENDS = ("sdpa", "blockwise", "metal")
DTYPES = ("float32", "float16", "bfloat16")
PARITY_CASES = 54
PARITY_HEADS = 2
HEAD_DIM = 64
SCALE = HEAD_DIM**-0.5
TEXT = 129  # the t2i text block: the soi sits at position 129


# -- parity layouts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One attention call: rows `layouts`, queries [q_start, q_end), keys [0, key_len)."""

    kind: str
    layouts: tuple[Layout, ...]
    q_start: int
    q_end: int
    key_len: int


CASE_KINDS = ("t2i-cfg-cached", "t2i-cfg-whole", "mmu", "mmu-vit", "lm", "lm-cached", "mixed", "decode", "odd")


def _t2i_pair(rng: np.random.Generator, length: int) -> tuple[Layout, ...]:
    """A CFG pair: a prompt with some left pads and the unconditional prompt (all but a few padded)."""
    soi = int(rng.integers(2, length - 2))
    few = int(rng.integers(0, soi))
    return (t2i_layout(length, few, soi, length - 1), t2i_layout(length, max(0, soi - 3), soi, length - 1))


def _row(rng: np.random.Generator, length: int) -> Layout:
    kind = rng.integers(4)
    if kind == 0:
        return _t2i_pair(rng, length)[int(rng.integers(2))]
    if kind == 1:
        return mmu_layout(length, int(rng.integers(0, length)))
    if kind == 2:
        system = int(rng.integers(0, length - 2))
        return mmu_vit_layout(length, system, int(rng.integers(0, length - 1 - system)))
    return causal_layout(length)


def make_case(kind: str, rng: np.random.Generator, max_len: int = 120) -> Case:
    """A random call of `kind` (CASE_KINDS) with rows of length 5..max_len (odd lengths included)."""
    length = int(rng.integers(5, max_len + 1))
    if kind == "t2i-cfg-cached":
        layouts = _t2i_pair(rng, length)
        soi = layouts[0].first_image_position
        return Case(kind, layouts, soi, length, length)
    if kind == "t2i-cfg-whole":
        return Case(kind, _t2i_pair(rng, length), 0, length, length)
    if kind == "mmu":
        return Case(kind, (mmu_layout(length, int(rng.integers(0, length))),), 0, length, length)
    if kind == "mmu-vit":
        system = int(rng.integers(0, length - 2))
        return Case(kind, (mmu_vit_layout(length, system, int(rng.integers(0, length - 1 - system))),), 0, length, length)
    if kind == "lm":
        return Case(kind, (causal_layout(length),), 0, length, length)
    if kind == "lm-cached":
        start = int(rng.integers(1, length))
        return Case(kind, (causal_layout(length),), start, length, length)
    if kind == "mixed":
        layouts = tuple(_row(rng, length) for _ in range(int(rng.integers(2, 4))))
        return Case(kind, layouts, int(rng.integers(0, length)), length, length)
    if kind == "decode":  # one new query over a cache (keys may stop short of the row)
        rows = tuple(_row(rng, length) for _ in range(int(rng.integers(1, 3))))
        key_len = int(rng.integers(2, length + 1))
        return Case(kind, rows, key_len - 1, key_len, key_len)
    if kind == "odd":
        rows = tuple(_row(rng, length) for _ in range(int(rng.integers(1, 4))))
        q_start = int(rng.integers(0, length))
        q_end = int(rng.integers(q_start + 1, length + 1))
        return Case(kind, rows, q_start, q_end, int(rng.integers(q_end, length + 1)))
    raise ValueError(f"unknown case kind {kind!r}")


def parity_cases(count: int = PARITY_CASES, seed: int = 0, max_len: int = 120) -> list[Case]:
    """`count` calls cycling through CASE_KINDS, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    return [make_case(CASE_KINDS[i % len(CASE_KINDS)], rng, max_len) for i in range(count)]


def reference_attention(q, k, v, layouts: Sequence[Layout], q_start: int, scale: float) -> np.ndarray:
    """softmax(q·kᵀ·scale restricted to allowed keys)·v in float64 NumPy, q (B, H, Lq, D)."""
    q, k, v = (np.array(x.astype(mx.float32) if isinstance(x, mx.array) else x, dtype=np.float64) for x in (q, k, v))
    mask = batch_allowed(layouts, q_start, q_start + q.shape[2])[:, None, :, : k.shape[2]]
    scores = np.where(mask, q @ k.swapaxes(-1, -2) * scale, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True)) @ v


def random_qkv(batch: int, heads: int, q_len: int, k_len: int, dim: int, seed: int, dtype) -> tuple[mx.array, ...]:
    keys = mx.random.split(mx.random.key(seed), 3)
    shapes = ((batch, heads, q_len, dim), (batch, heads, k_len, dim), (batch, heads, k_len, dim))
    return tuple(mx.random.normal(s, key=key).astype(dtype) for s, key in zip(shapes, keys))


RUNNERS: dict[str, Callable] = {
    "sdpa": lambda q, k, v, c: masked_sdpa(q, k, v, c.layouts, c.q_start, SCALE),
    "blockwise": lambda q, k, v, c: blockwise_attention(q, k, v, c.layouts, c.q_start, SCALE),
    "metal": lambda q, k, v, c: metal_attention.omni_attention_metal(q, k, v, c.layouts, c.q_start, SCALE),
}


def parity(backends: Sequence[str], dtypes: Sequence[str], cases: Sequence[Case], heads: int = PARITY_HEADS) -> dict:
    """{backend: {dtype: {max_rel_error, max_abs_error, worst_case, cases, pass}}} or {backend: {error}}."""
    results: dict = {b: {} for b in backends}
    for dtype in dtypes:
        for i, case in enumerate(cases):
            q, k, v = random_qkv(len(case.layouts), heads, case.q_end - case.q_start, case.key_len, HEAD_DIM, i, getattr(mx, dtype))
            ref = reference_attention(q, k, v, case.layouts, case.q_start, SCALE)
            scale_ref = max(float(np.abs(ref).max()), 1e-30)
            for backend in backends:
                if "error" in results[backend]:
                    continue
                try:
                    out = np.array(RUNNERS[backend](q, k, v, case).astype(mx.float32), dtype=np.float64)
                except Exception as exc:  # a kernel that fails to compile or run is reported, not fatal
                    results[backend] = {"error": " ".join(f"{type(exc).__name__}: {exc}".split())[:300]}
                    continue
                err = float(np.abs(out - ref).max()) if out.shape == ref.shape else float("inf")
                err = err if np.isfinite(err) else float("inf")
                entry = results[backend].setdefault(
                    dtype, {"max_rel_error": 0.0, "max_abs_error": 0.0, "worst_case": None, "cases": 0}
                )
                entry["cases"] += 1
                entry["max_abs_error"] = max(entry["max_abs_error"], err)
                if err / scale_ref >= entry["max_rel_error"]:
                    entry["max_rel_error"] = err / scale_ref
                    entry["worst_case"] = f"#{i} {case.kind}"
    for per_dtype in results.values():
        for dtype, entry in per_dtype.items():
            if dtype in TOLERANCES:
                entry["tolerance"] = TOLERANCES[dtype]
                entry["pass"] = entry["max_rel_error"] <= TOLERANCES[dtype]
    return results


# -- timing on Show-o's shapes ----------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    name: str
    kind: str  # "hot" (every query of a row sees the same keys) or "prefill" (rows differ)
    layouts: tuple[Layout, ...]
    q_start: int

    @property
    def length(self) -> int:
        return self.layouts[0].length


def cfg_pair(length: int) -> tuple[Layout, ...]:
    """A prompt with 5 left pads and the unconditional prompt (126 of 129 padded)."""
    return (t2i_layout(length, 5, TEXT, length - 1), t2i_layout(length, 126, TEXT, length - 1))


def timing_shapes(quick: bool = False) -> list[Shape]:
    shapes = [
        Shape("hot loop 256 px", "hot", cfg_pair(387), TEXT),
        Shape("hot loop 512 px", "hot", cfg_pair(1155), TEXT),
        Shape("prefill t2i 256 px (whole rows)", "prefill", cfg_pair(387), 0),
        Shape("prefill ask 256 px", "prefill", (mmu_layout(276, 258),), 0),
    ]
    return [s for s in shapes if not (quick and "512" in s.name)]


def best_ms(fn: Callable[[], mx.array], repeats: int) -> float:
    """Best wall time in ms over `repeats` fully evaluated runs after one warm-up run."""
    return interleaved_best_ms({"fn": fn}, repeats)["fn"]


def interleaved_best_ms(calls: dict[str, Callable[[], mx.array]], repeats: int) -> dict[str, float | str]:
    """Best wall time in ms of each call over `repeats` rounds that run every call once, after one
    warm-up round: on a busy machine a slow spell then hurts all of them, not one. A call that
    raises is reported as "failed: ..." and dropped from later rounds."""
    results: dict[str, float | str] = {}
    live = dict(calls)
    for round_ in range(repeats + 1):
        for name, fn in list(live.items()):
            try:
                start = time.perf_counter()
                mx.eval(fn())
                elapsed = (time.perf_counter() - start) * 1e3
            except Exception as exc:  # a kernel that fails to compile or run is reported, not fatal
                results[name] = " ".join(f"failed: {type(exc).__name__}: {exc}".split())[:200]
                del live[name]
                continue
            if round_ > 0:  # round 0 is the warm-up
                results[name] = min(results.get(name, float("inf")), elapsed)
    return results


def time_shape(shape: Shape, backends: Sequence[str], dtype: str, heads: int, repeats: int) -> dict:
    """{backend: ms} for one shape. The masks and plans are built before the clock starts (the model
    builds them once per prompt); each call ends as the model consumes it, reshaped to (B, Lq, H·D)."""
    b, lq = len(shape.layouts), shape.length - shape.q_start
    q, k, v = random_qkv(b, heads, lq, shape.length, HEAD_DIM, 0, getattr(mx, dtype))
    mx.eval(q, k, v)
    mask = attention_mask(shape.layouts, shape.q_start)
    sdpa_mask = mask.sdpa_mask() if mask is not None else None
    plan64 = make_block_plan(shape.layouts, shape.q_start, shape.length, shape.length, 64, 64)
    plan32 = make_block_plan(shape.layouts, shape.q_start, shape.length, shape.length, metal_attention.BLOCK_Q, metal_attention.BLOCK_K)
    calls: dict[str, Callable[[], mx.array]] = {
        "sdpa": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=SCALE, mask=sdpa_mask),
        "blockwise": lambda: blockwise_attention_with_plan(q, k, v, plan64, SCALE),
        "metal": lambda: metal_attention.omni_attention_metal_with_plan(q, k, v, plan32, SCALE),
    }
    consumed = {name: (lambda call=calls[name]: call().transpose(0, 2, 1, 3).reshape(b, lq, -1)) for name in backends}
    return {name: round(ms, 3) if isinstance(ms, float) else ms for name, ms in interleaved_best_ms(consumed, repeats).items()}


def timing(
    backends: Sequence[str], dtypes: Sequence[str], quick: bool, log: Callable[[str], None], reduced: str | None = None
) -> dict:
    """Times on every shape; `quick` (or a `reduced` reason, e.g. a slow BLAS) times 4 heads, once,
    without the 512 px shape."""
    quick = quick or reduced is not None
    heads = 4 if quick else 32
    repeats = 1 if quick else 3
    shapes = []
    for shape in timing_shapes(quick):
        plan32 = make_block_plan(shape.layouts, shape.q_start, block_q=metal_attention.BLOCK_Q, block_k=metal_attention.BLOCK_K)
        entry = {
            "name": shape.name, "kind": shape.kind, "batch": len(shape.layouts), "heads": heads, "head_dim": HEAD_DIM,
            "q_len": shape.length - shape.q_start, "k_len": shape.length,
            "metal_tile_density": round(plan32.density(), 4), "ms": {},
        }  # fmt: skip
        for dtype in dtypes:
            log(f"timing {shape.name} ({dtype})")
            entry["ms"][dtype] = time_shape(shape, backends, dtype, heads, repeats)
        shapes.append(entry)
    return {"heads": heads, "repeats": repeats, "dtypes": list(dtypes), "shapes": shapes, **({"reduced": reduced} if reduced else {})}


# -- the machine -----------------------------------------------------------------------------------
def system_info() -> dict:
    from . import __version__

    info: dict = {
        "showo_mlx": __version__,
        "mlx": mx.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "default_device": str(mx.default_device()),
        "device_name": device_name(),
        "cpu_count": os.cpu_count(),
    }
    if sys.platform.startswith("linux"):
        from .launcher import blas_status

        info["blas"] = blas_status()
    if sys.platform == "darwin":
        info["memory"] = memory_limits()
    return info


def memory_limits() -> dict:
    """What MLX may use on this Mac: the device's memory facts and MLX's current limits (bytes)."""
    out: dict = {}
    if mx.metal.is_available():
        info_fn = getattr(mx, "device_info", None)
        try:
            info = info_fn(mx.gpu) if info_fn else mx.metal.device_info()
        except Exception as exc:  # pragma: no cover - only on unusual builds
            info = {"error": str(exc)}
        out.update({k: v for k, v in info.items() if "memory" in k or "size" in k or "length" in k})
    if hasattr(mx, "get_memory_limit"):
        out["mlx_memory_limit"] = int(mx.get_memory_limit())
    out["mlx_active_memory"] = int(mx.get_active_memory())
    return out


def backend_status() -> dict:
    reason = metal_attention.metal_unavailable_reason()
    return {
        "sdpa": {"available": True},
        "blockwise": {"available": True},
        "metal": {"available": reason is None, **({"reason": reason} if reason else {})},
    }


def choices(report: dict) -> dict:
    """What SHOWO_ATTENTION=auto uses with this report, per dtype and kind of call."""
    out = {}
    metal_ready = report["backends"]["metal"]["available"]
    for dtype in DTYPES:
        out[dtype] = {}
        for kind in KINDS:
            if not metal_ready:
                use, why = False, f"metal unavailable: {report['backends']['metal']['reason']}"
            else:
                use, why = metal_verdict(report, dtype, kind)
            out[dtype][kind] = {"backend": "metal" if use else "sdpa", "reason": why}
    return out


def run_doctor(quick: bool = False, log: Callable[[str], None] = lambda m: None) -> dict:
    """Every measurement of `showo doctor` as one JSON-ready dict."""
    start = time.perf_counter()
    report: dict = {
        "schema": SCHEMA, "key": cache_key(), "date": date.today().isoformat(), "quick": quick,
        "system": system_info(), "backends": backend_status(),
    }  # fmt: skip
    backends = [b for b in BACKENDS if report["backends"][b]["available"]]
    cases = parity_cases()
    log(f"parity: {len(backends)} backends x {len(DTYPES)} dtypes x {len(cases)} layouts")
    report["parity"] = {
        "cases": len(cases),
        "kinds": {kind: sum(c.kind == kind for c in cases) for kind in CASE_KINDS},
        "heads": PARITY_HEADS,
        "head_dim": HEAD_DIM,
        "metric": "max |out - ref| / max |ref| over every output of every layout (ref: float64 NumPy)",
        "results": parity(backends, DTYPES, cases),
    }
    for name in BACKENDS:
        if name not in backends:
            report["parity"]["results"][name] = {"unavailable": report["backends"][name]["reason"]}
    # MLX's CPU backend runs float16/bfloat16 matmuls without BLAS: only float32 is worth timing there.
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    timing_dtypes = DTYPES if on_gpu else ("float32",)
    reduced = None
    if not on_gpu and not quick:
        from .launcher import slow_blas_hint

        hint = slow_blas_hint()
        if hint:  # the bundled reference BLAS: full-size timing would take many minutes
            log(hint)
            reduced = "slow BLAS (see the warning above): 4 heads, no 512 px"
    report["timing"] = timing(backends, timing_dtypes, quick, log, reduced)
    report["choice"] = choices(report)
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def cache_report(report: dict) -> Path | None:
    """Write the report where the automatic choice reads it. A --quick report never replaces a full one."""
    from .fsutil import atomic_write_bytes

    path = report_path(report["key"])
    if report.get("quick") and path.exists():
        try:
            if not json.loads(path.read_text()).get("quick", True):
                return None
        except (OSError, ValueError):
            pass
    atomic_write_bytes(path, json.dumps(report, indent=2).encode())
    return path


# -- printing -----------------------------------------------------------------------------------------
def _num(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else str(value)


def format_report(report: dict) -> str:
    s = report["system"]
    lines = [
        f"showo doctor {report['date']}{' (--quick)' if report.get('quick') else ''}: "
        f"showo-mlx {s['showo_mlx']}, mlx {s['mlx']}, Python {s['python']}, {s['platform']}",
        f"device: {s['device_name']}, default {s['default_device']}",
    ]
    if "blas" in s:
        lines.append(f"BLAS: {s['blas']}")
    if "memory" in s:
        lines.append("memory: " + ", ".join(f"{k} {v / 1e9:.2f} GB" if isinstance(v, int) else f"{k} {v}" for k, v in s["memory"].items()))
    for name, status in report["backends"].items():
        lines.append(f"  {name:<9} {'available' if status['available'] else 'unavailable: ' + status['reason']}")

    p = report["parity"]
    lines += ["", f"parity: max |out - ref| / max |ref| against float64 NumPy, {p['cases']} layouts "
              f"({', '.join(f'{n} {k}' for k, n in p['kinds'].items())}), {p['heads']} heads of {p['head_dim']}"]
    lines.append(f"  {'backend':<9}" + "".join(f"{d:>20}" for d in DTYPES))
    for name in BACKENDS:
        result = p["results"].get(name, {})
        if "unavailable" in result or "error" in result:
            lines.append(f"  {name:<9} {'unavailable' if 'unavailable' in result else 'FAILED: ' + result['error']}")
            continue
        cells = []
        for d in DTYPES:
            e = result.get(d)
            cells.append(f"{e['max_rel_error']:.1e} {'ok' if e['pass'] else 'WRONG'}" if e else "-")
        lines.append(f"  {name:<9}" + "".join(f"{c:>20}" for c in cells))
    lines.append("  tolerances: " + ", ".join(f"{d} {t:g}" for d, t in TOLERANCES.items()))

    t = report["timing"]
    lines += ["", f"time per attention call, ms (best of {t['repeats']}; B x {t['heads']} heads x 64; "
              f"tiles = share of the Metal kernel's 32x32 tiles computed)"
              + (f"; reduced: {t['reduced']}" if t.get("reduced") else "")]
    head = f"  {'shape':<32} {'dtype':<9} {'Lq x Lk':>11} {'tiles':>6}" + "".join(f"{b:>11}" for b in BACKENDS)
    lines.append(head)
    for shape in t["shapes"]:
        for dtype, ms in shape["ms"].items():
            cells = [_num(ms.get(b, "-"), ".2f") if not str(ms.get(b, "")).startswith("failed") else "failed" for b in BACKENDS]
            lines.append(f"  {shape['name']:<32} {dtype:<9} {shape['q_len']:>5}x{shape['k_len']:<5} "
                         f"{shape['metal_tile_density']:>6.0%}" + "".join(f"{c:>11}" for c in cells))

    lines += ["", "SHOWO_ATTENTION=auto (the default) uses (hot = MaskGIT loop, prefill = rows differ):"]
    picks = [(dtype, kind, c["backend"], c["reason"]) for dtype, per_kind in report["choice"].items() for kind, c in per_kind.items()]
    if len({(b, r) for *_, b, r in picks}) == 1:
        lines.append(f"  every dtype and call: {picks[0][2]} ({picks[0][3]})")
    else:
        lines += [f"  {dtype:<9} {kind:<8} {backend:<6} {reason}" for dtype, kind, backend, reason in picks]
    lines.append(f"took {report['seconds']} s")
    return "\n".join(lines)


def parity_passed(report: dict) -> bool:
    """True when every backend that ran is within tolerance in every dtype."""
    for result in report["parity"]["results"].values():
        if "unavailable" in result:
            continue
        if "error" in result or not all(e.get("pass") for e in result.values()):
            return False
    return True


# -- the command -------------------------------------------------------------------------------------
def register(app) -> None:
    """Add `showo doctor` to a typer app."""
    import typer

    from .cli_common import handle_errors

    @app.command(epilog=(
        "Examples:\n\n"
        "  showo doctor\n\n"
        "  showo doctor --json doctor.json\n\n"
        "  showo doctor --quick --json quick.json --force\n"
    ))
    @handle_errors(interrupted="interrupted")
    def doctor(
        json_out: Optional[str] = typer.Option(None, "--json", help="Also write the report to this JSON file (default: only the cached copy)."),
        quick: bool = typer.Option(False, "--quick", help="Smaller timing pass (4 heads, no 512 px), parity unchanged; a quick report never enables the Metal kernel; off by default."),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing --json file; off by default."),
    ):
        """Check attention on this machine: parity of every backend, its speed, the automatic choice."""
        from .errors import OutputExistsError
        from .fsutil import atomic_write_bytes

        if json_out and Path(json_out).exists() and not force:
            raise OutputExistsError(f"{json_out} already exists; pass --force to replace it or choose another output")
        report = run_doctor(quick=quick, log=lambda m: typer.echo(m, err=True))
        cached = cache_report(report)
        typer.echo(format_report(report))
        if cached:
            typer.echo(f"cached for the automatic choice: {cached}", err=True)
        if json_out:
            atomic_write_bytes(json_out, json.dumps(report, indent=2).encode())
            typer.echo(f"wrote {json_out}", err=True)
        if not parity_passed(report):
            typer.echo("attention parity FAILED for a backend above; please attach the JSON to an issue", err=True)
            raise typer.Exit(1)


def main() -> None:
    """`python -m showo_mlx.doctor [options]`."""
    import typer

    from .launcher import prepare_process

    prepare_process()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    app()


if __name__ == "__main__":
    main()
