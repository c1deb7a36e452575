"""Memory controls for small machines (`--low-ram`) and the numbers `showo bench` reports.

What costs memory in Show-o, in order: the transformer weights (5.8 GB float32, ~0.8 GB at 4 bits),
the temporaries of one graph evaluation, MLX's buffer cache, and the MAGVIT encoder (55 M of
MAGVIT's 95 M parameters, needed only to read an input image).

The temporaries are the surprise. MLX allocates an operation's output when it dispatches it, and
it dispatches ahead of the computation; it only waits for earlier work while the active memory is
above the memory limit (default: most of the RAM). So one MAGVIT ResnetBlock at 256 px holds both
convolutions' im2col buffers at once (measured: 1.07 GB for a block, 1.59 GB for the whole decoder,
where 0.47 GB is the largest single convolution). Therefore:

* MAGVIT encode/decode always run `magvit_throttle()`: the memory limit is set a little above what
  is resident, which makes the evaluator wait for finished work instead of allocating ahead
  (identical outputs). By default the headroom is 512 MB (extra peak 0.68 GB instead of 1.6 GB, at
  the same speed on CPU); with `--low-ram` 64 MB (0.47 GB, ~5-15 % slower on CPU). The transformer
  is not throttled: its temporaries are small (0.3-0.45 GB per 256 px step) and fully serial
  dispatch made a float32 step 2.2x slower on CPU;
* `--low-ram` also caps the buffer cache (`apply_low_ram`), so freed buffers return to the system
  instead of being kept for reuse, and lets the pipeline drop the MAGVIT encoder right after an
  image is encoded (`drop_encoder`).

`mx.set_wired_limit` is deliberately left alone: it keeps a model wired in GPU memory on Apple
silicon, the opposite of what a small machine needs, and does nothing on Linux.
"""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx

LOW_RAM_CACHE_BYTES = 64 << 20  # enough to recycle the small per-token buffers of text decoding
# Headroom above the resident arrays while MAGVIT runs. Measured at 256 px, float32 (extra peak,
# time): 0-128 MB → 0.47 GB, +5-15 %; 256 MB → 0.60 GB; 512 MB → 0.68 GB, same time as unthrottled;
# unthrottled → 1.6 GB.
LOW_RAM_HEADROOM = 64 << 20
DEFAULT_HEADROOM = 512 << 20
GB = 1e9


@dataclass
class MemorySettings:
    cache_limit: int


def apply_low_ram(cache_limit: int = LOW_RAM_CACHE_BYTES) -> MemorySettings:
    """Cap MLX's buffer cache (process-wide; call once, e.g. when the pipeline is created)."""
    mx.set_cache_limit(cache_limit)
    mx.clear_cache()
    return MemorySettings(cache_limit=cache_limit)


@contextmanager
def throttled(enabled: bool = True, headroom: int = LOW_RAM_HEADROOM) -> Iterator[None]:
    """Within the block, evaluation waits for finished work whenever active memory exceeds what is
    resident at entry plus `headroom`. Evaluate inside the block (lazy arrays returned unevaluated
    would be computed later, unthrottled). The memory limit is a guideline, not a cap: going above
    it never fails while RAM is left."""
    if not enabled:
        yield
        return
    previous = mx.set_memory_limit(active_bytes() + headroom)
    try:
        yield
    finally:
        mx.set_memory_limit(previous)


def magvit_throttle(low_ram: bool = False):
    """The throttle MAGVIT encode/decode run under: 512 MB headroom, 64 MB with `--low-ram`."""
    return throttled(True, LOW_RAM_HEADROOM if low_ram else DEFAULT_HEADROOM)


def drop_encoder(vq):
    """Remove the MAGVIT encoder's weights from `vq` in place and return it, now decoder-only.

    The module is a dict of sub-modules; popping the entry drops the last reference to the
    encoder's arrays, and `clear_cache` hands their memory back instead of keeping it for reuse."""
    if "encoder" in vq:
        vq.pop("encoder")
        mx.clear_cache()
    return vq


# -- measuring --------------------------------------------------------------------------------------
def reset_peak() -> None:
    """Start a measurement: forget the previous peak, and hand cached buffers back to the system so
    the process's resident size reflects the next phase only."""
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()


def peak_bytes() -> int:
    """Peak of MLX's active memory since `reset_peak` (arrays alive at once, resident weights included)."""
    mx.synchronize()
    return int(mx.get_peak_memory())


def active_bytes() -> int:
    mx.synchronize()
    return int(mx.get_active_memory())


def max_rss_bytes() -> int:
    """Peak resident set size of the process (kilobytes on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
