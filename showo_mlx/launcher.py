"""Linux CPU speed: run with OpenBLAS instead of the reference BLAS bundled in the MLX wheel.

The Linux `mlx[cpu]` wheel links the reference (netlib) BLAS: float32 matmuls and convolutions run at
~1.5 GFLOP/s, about 100x slower than Debian's OpenBLAS on the same cores. The dynamic linker can swap
the library in at start-up (LD_PRELOAD); it cannot be done from inside a running process, so the
`showo` command re-executes itself once with the variables set, by default on Linux whenever the
library is installed:

    showo generate "..."                          (OpenBLAS when installed; SHOWO_OPENBLAS=0: off)

When it is not installed, `showo` says once which package to install (not for --help/--version).
In Python a library re-exec'ing its caller would be surprising, so it happens only on request:
`showo_mlx.enable_openblas()` at the top of a script; `showo_mlx.load()` prints the hint once when
the slow BLAS is in use. A no-op off Linux. `blas_status()` reports which BLAS the process uses,
and `slow_blas_hint()` the fix when it is the slow one.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ENV_OPT_IN = "SHOWO_OPENBLAS"  # "0" turns the default re-exec off; "1" (or --openblas) asks for it
ENV_DONE = "SHOWO_OPENBLAS_REEXEC"  # set in the child, so a failed preload never loops
FLAG = "--openblas"
HELP_FLAGS = ("-h", "--help", "--version")
# Debian/Ubuntu package libopenblas0-pthread (multi-threaded); the openmp and serial variants work too.
CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
)
INSTALL_HINT = "sudo apt-get install libopenblas0-pthread"
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
    """On by default; SHOWO_OPENBLAS=0 turns it off unless --openblas asks for it explicitly."""
    return FLAG in argv or environ.get(ENV_OPT_IN, "").strip() != "0"


def needs_compute(argv: list[str]) -> bool:
    """False for invocations that only print help or the version (nothing worth a re-exec or a hint)."""
    args = argv[1:]
    return bool(args) and not any(a in HELP_FLAGS for a in args)


_hint_shown = False


def install_hint() -> str:
    return (f"note: MLX's Linux wheel computes with a slow reference BLAS (~100x slower float32 matmuls); "
            f"install OpenBLAS ({INSTALL_HINT}) and showo-mlx uses it (SHOWO_OPENBLAS=0 silences this)")


def hint_once(log=None) -> bool:
    """Print the install hint the first time in this process; True if printed now."""
    global _hint_shown
    if _hint_shown:
        return False
    _hint_shown = True
    (log or (lambda m: print(m, file=sys.stderr)))(install_hint())
    return True


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
    """Call first thing in `main()`. On Linux, re-exec with OpenBLAS preloaded (does not return)
    unless SHOWO_OPENBLAS=0, it is already loaded, or the command only prints help; without the
    library, print the install hint once. Always removes --openblas from sys.argv so the CLI never
    sees it."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    wanted = wants_openblas(argv, environ)
    while FLAG in argv:
        argv.remove(FLAG)
    if not wanted or not sys.platform.startswith("linux") or not needs_compute(argv):
        return
    if environ.get(ENV_DONE) or "libopenblas" in environ.get("LD_PRELOAD", ""):
        return  # already preloaded (by us or by the user)
    lib = find_openblas()
    if lib is None:
        hint_once()
        return
    sys.stderr.flush()
    sys.stdout.flush()
    execve(sys.executable, child_argv(), preload_env(environ, lib))


def enable_openblas(*, environ=None, execve=os.execve, log=None) -> bool:
    """Python API: make MLX use OpenBLAS on Linux by re-executing this Python process once with it
    preloaded (the script starts again from the top with the same arguments, so call this first).

    Returns True when OpenBLAS is already in use (e.g. in the re-executed process) and False when
    nothing can be done: not Linux, the library is not installed (prints the install hint), or an
    interactive session, which a re-exec would end (prints the LD_PRELOAD line to start Python with
    instead). Does not return when it re-executes."""
    environ = os.environ if environ is None else environ
    say = log or (lambda m: print(m, file=sys.stderr))
    if not sys.platform.startswith("linux"):
        return False
    if openblas_loaded():
        return True
    lib = find_openblas()
    if lib is None:
        hint_once(say)
        return False
    if environ.get(ENV_DONE) or "libopenblas" in environ.get("LD_PRELOAD", ""):
        say(f"note: OpenBLAS is in LD_PRELOAD but not loaded; check the path ({lib} is installed)")
        return False
    if _interactive():
        kind = core_type()
        say(f"note: enable_openblas() cannot restart an interactive session; start Python with "
            f"LD_PRELOAD={lib}" + (f" OPENBLAS_CORETYPE={kind}" if kind else ""))
        return False
    global _hint_shown
    _hint_shown = True
    sys.stderr.flush()
    sys.stdout.flush()
    execve(sys.executable, child_argv(), preload_env(environ, lib))
    return True  # only reached with a test's execve


def _interactive() -> bool:
    """A session a re-exec would end or could not repeat: the REPL, IPython/Jupyter, or a script
    read from stdin (no file to run again)."""
    if hasattr(sys, "ps1") or sys.flags.interactive or "IPython" in sys.modules:
        return True
    orig = list(getattr(sys, "orig_argv", []))
    has_file = bool(getattr(sys.modules.get("__main__"), "__file__", None))
    return not has_file and "-c" not in orig and "-m" not in orig


def slow_blas_in_use(environ=None) -> bool:
    """Linux, MLX on the CPU, no OpenBLAS mapped, and the user did not switch it off."""
    environ = os.environ if environ is None else environ
    if not sys.platform.startswith("linux") or environ.get(ENV_OPT_IN, "").strip() == "0":
        return False
    import mlx.core as mx

    if mx.default_device().type != mx.DeviceType.cpu:
        return False
    return not openblas_loaded()


def blas_hint_once(log=None, environ=None) -> None:
    """For `load()`: the one-line hint, at most once per process, when the slow BLAS is in use."""
    global _hint_shown
    if _hint_shown or not slow_blas_in_use(environ):
        return
    _hint_shown = True
    hint = install_hint() if find_openblas() is None else (
        "note: MLX computes with its bundled reference BLAS here (~100x slower float32 matmuls than "
        "OpenBLAS, which is installed); call showo_mlx.enable_openblas() first thing in your script")
    (log or (lambda m: print(m, file=sys.stderr)))(hint)


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
