"""Linux CPU speed: run with OpenBLAS instead of the reference BLAS bundled in the MLX wheel.

The Linux `mlx[cpu]` wheel links the reference (netlib) BLAS: float32 matmuls and convolutions run at
~1.5 GFLOP/s, about 100x slower than Debian's OpenBLAS on the same cores. The dynamic linker can swap
the library in at start-up (LD_PRELOAD); it cannot be done from inside a running process, so this
module re-executes the command once with the variables set:

    SHOWO_OPENBLAS=1 showo generate "..."        or        showo --openblas generate "..."

It is opt-in (a re-exec surprises debuggers and wrappers), a no-op off Linux, and a no-op when the
library is missing (then it says which package to install). `blas_status()` reports which BLAS the
process uses, and `slow_blas_hint()` the fix when it is the slow one.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ENV_OPT_IN = "SHOWO_OPENBLAS"
ENV_DONE = "SHOWO_OPENBLAS_REEXEC"  # set in the child, so a failed preload never loops
FLAG = "--openblas"
# Debian/Ubuntu package libopenblas0-pthread (multi-threaded); the openmp and serial variants work too.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
)
INSTALL_HINT = "apt-get install -y libopenblas0-pthread"
SLOW_GFLOPS = 10.0  # the reference BLAS manages ~1.5; any real BLAS is far above


def find_openblas() -> str | None:
    """Path of an installed OpenBLAS shared library, or None."""
    override = os.environ.get("SHOWO_OPENBLAS_LIB")
    for path in ((override,) if override else ()) + CANDIDATES:
        if path and Path(path).is_file():
            return path
    return None


def core_type() -> str | None:
    """OPENBLAS_CORETYPE for this CPU. OpenBLAS 0.3.21 does not recognise recent CPUs and falls back
    to a generic kernel (measured 39 vs 248 GFLOP/s on an AVX-512 Xeon); naming the kernel family
    from the CPU flags fixes that."""
    try:
        flags = next(
            (line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("flags")),
            [],
        )
    except OSError:
        return None
    if "avx512f" in flags and "avx512bw" in flags:
        return "SkylakeX"
    if "avx2" in flags:
        return "Haswell"
    return None


def openblas_loaded() -> bool:
    """True when an OpenBLAS library is mapped into this process (Linux: /proc/self/maps)."""
    try:
        return "libopenblas" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def wants_openblas(argv: list[str], environ: os._Environ | dict) -> bool:
    return FLAG in argv or environ.get(ENV_OPT_IN, "") not in ("", "0")


def preload_env(environ, lib: str) -> dict[str, str]:
    """The environment of the re-executed process: OpenBLAS first in LD_PRELOAD, a core type
    unless the user chose one, and the marker that stops a second re-exec."""
    env = dict(environ)
    old = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{lib}:{old}" if old else lib
    kind = core_type()
    if kind and not env.get("OPENBLAS_CORETYPE"):
        env["OPENBLAS_CORETYPE"] = kind
    env[ENV_DONE] = "1"
    env[ENV_OPT_IN] = "1"
    return env


def child_argv() -> list[str]:
    """The command line that started this interpreter (keeps `-m module`), minus --openblas."""
    argv = list(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    argv[0] = sys.executable
    return [a for a in argv if a != FLAG]


def prepare_process(argv: list[str] | None = None, environ=None, execve=os.execve) -> None:
    """Call first thing in `main()`. With the opt-in on Linux, re-exec with OpenBLAS preloaded
    (does not return); otherwise only removes --openblas from sys.argv so the CLI never sees it."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    opted_in = wants_openblas(argv, environ)
    while FLAG in argv:
        argv.remove(FLAG)
    if not opted_in or not sys.platform.startswith("linux"):
        return
    if environ.get(ENV_DONE) or "libopenblas" in environ.get("LD_PRELOAD", ""):
        return  # already preloaded (by us or by the user)
    lib = find_openblas()
    if lib is None:
        print(f"note: --openblas/SHOWO_OPENBLAS: no OpenBLAS found; install it ({INSTALL_HINT})", file=sys.stderr)
        return
    sys.stderr.flush()
    sys.stdout.flush()
    execve(sys.executable, child_argv(), preload_env(environ, lib))


def matmul_gflops(n: int = 256, repeats: int = 3) -> float:
    """float32 GFLOP/s of an n×n matmul on the default device (best of `repeats`; ~20 ms on the
    reference BLAS, well under 1 ms on a real one)."""
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def blas_status() -> str:
    """One line naming the BLAS this process computes float32 matmuls with."""
    import mlx.core as mx

    if mx.metal.is_available():
        return "Metal GPU"
    if not sys.platform.startswith("linux"):
        return "CPU (Accelerate)" if sys.platform == "darwin" else "CPU"
    if openblas_loaded():
        chosen, best = os.environ.get("OPENBLAS_CORETYPE"), core_type()
        note = f"; this CPU supports {best}" if best and chosen and chosen.lower() != best.lower() else ""
        return f"CPU, OpenBLAS preloaded (OPENBLAS_CORETYPE={chosen or 'auto'}{note})"
    return f"CPU, BLAS bundled with the wheel ({matmul_gflops():.1f} GFLOP/s float32)"


def slow_blas_hint() -> str | None:
    """How to fix a slow BLAS, or None when the process already runs a fast one."""
    import mlx.core as mx

    if mx.metal.is_available() or not sys.platform.startswith("linux") or openblas_loaded():
        return None
    gflops = matmul_gflops()
    if gflops >= SLOW_GFLOPS:
        return None
    how = "re-run with --openblas (or SHOWO_OPENBLAS=1)" if find_openblas() else f"install OpenBLAS ({INSTALL_HINT}) and re-run with --openblas"
    return (
        f"warning: float32 matmul runs at {gflops:.1f} GFLOP/s: MLX's Linux wheel uses the reference BLAS, "
        f"~100x slower than OpenBLAS; {how}"
    )
