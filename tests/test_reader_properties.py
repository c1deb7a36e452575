"""Property tests (hypothesis) for the readers of untrusted files: random byte mutations of a valid
safetensors file, a valid torch `.bin` and valid config.json files never crash, never run longer
than 2 s, never allocate more than twice the original file's declared tensor bytes, and each either
loads or raises one of our typed errors. What "loads" must mean:

* `.bin`: exactly the original tensors (the zip's CRCs cover data.pkl and every storage, so any
  other outcome is a reader bug);
* safetensors: exactly what the safetensors library reads from the same mutated bytes (the format
  has no checksum: a flipped byte inside tensor data is a different but valid file; a header the
  library refuses must be refused here too);
* config.json: a config that passes its own schema again (a mutated number can be another valid
  number), and our converted config round-trips unchanged.

Examples are derandomized (the same cases every run) and bounded in number; raise
SHOWO_FUZZ_EXAMPLES to search longer by hand."""

from __future__ import annotations

import json
import os
import signal
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save_file

import torch_format as tf
from conftest import REF
from showo_mlx.checkpoint_io import read_checkpoint
from showo_mlx.config import MagvitConfig, ShowoConfig, read_json
from showo_mlx.errors import CheckpointError, ShowoConfigError
from showo_mlx.loading import read_model_config

EXAMPLES = int(os.environ.get("SHOWO_FUZZ_EXAMPLES", "100"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=2000,  # ms per example: "never hangs"
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
rng = np.random.default_rng(0)
ARRAYS = {
    "embed.weight": rng.standard_normal((128, 256)).astype(np.float32),
    "fc.weight": rng.standard_normal((64, 256)).astype(np.float16),
    "fc.bias": rng.standard_normal(64).astype(np.float32),
    "steps": np.arange(5, dtype=np.int64),
    "mask": np.array([True, False]),
}
DECLARED = sum(a.nbytes for a in ARRAYS.values())  # 164 kB of tensors


def mutations(size: int):
    """1-3 edits; positions favour the first 2 kB (safetensors header, data.pkl) and the last 512
    bytes (the zip's central directory), where a byte changes structure rather than tensor values."""
    position = st.one_of(st.integers(0, min(2047, size - 1)), st.integers(0, size - 1), st.integers(max(0, size - 512), size - 1))
    edit = st.one_of(
        st.tuples(st.just("set"), position, st.integers(0, 255)),
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), position, st.integers(1, 16)),
        st.tuples(st.just("truncate"), position, st.just(0)),
    )
    return st.lists(edit, min_size=1, max_size=3)


def mutate(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, pos, arg in edits:
        pos = min(pos, max(len(out) - 1, 0))
        if kind == "set" and out:
            out[pos] = arg
        elif kind == "flip" and out:
            out[pos] ^= 1 << arg
        elif kind == "insert":
            out[pos:pos] = arg
        elif kind == "delete":
            del out[pos : pos + arg]
        elif kind == "truncate":
            del out[pos:]
    return bytes(out)


class Hang(Exception):
    pass


def measured(call):
    """(result or the exception raised, peak bytes allocated by Python and NumPy), with a hard 5 s
    alarm as a backstop to hypothesis' 2 s deadline (which is only checked after a call returns)."""

    def expired(*_):
        raise Hang("reader still running after 5 s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, 5)
    tracemalloc.start()
    try:
        result = call()
    except Hang:
        raise
    except Exception as exc:  # judged by the caller: only our typed errors are acceptable
        result = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    return result, peak


def same_tensors(got: dict, want: dict) -> bool:
    return sorted(got) == sorted(want) and all(
        got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and got[k].tobytes() == want[k].tobytes()
        for k in want
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def originals(folder) -> dict[str, bytes]:
    save_file(ARRAYS, str(folder / "orig.safetensors"))
    tf.save_torch(folder / "orig.bin", ARRAYS, metadata=True)
    showo = ShowoConfig.from_hub_dict(json.loads((REF / "showo" / "config.json").read_text()))
    magvit = MagvitConfig.from_hub_dict(json.loads((REF / "magvitv2" / "config.json").read_text()))
    converted = {
        "model_type": "showo", "format_version": 1, "dtype": "float32", "showo": showo.to_dict(),
        "magvit": magvit.to_dict(), "magvit_dtype": "float32",
        "quantization": {"group_size": 64, "bits": 4, "mode": "affine", "lm_head": {"group_size": 64, "bits": 8, "mode": "affine"}},
        "files": {"transformer": ["model.safetensors"], "magvit": "magvit.safetensors"},
    }  # fmt: skip
    return {
        "safetensors": (folder / "orig.safetensors").read_bytes(),
        "bin": (folder / "orig.bin").read_bytes(),
        "hub_config": (REF / "showo" / "config.json").read_bytes(),
        "converted_config": json.dumps(converted, indent=2).encode(),
    }


def test_the_valid_originals_load_within_the_bounds(folder, originals):
    for fmt in ("safetensors", "bin"):
        path = folder / f"orig.{fmt}"
        result, peak = measured(lambda: read_checkpoint(path))
        assert same_tensors(result, ARRAYS) and peak <= 2 * DECLARED, (fmt, peak)


@SETTINGS
@given(data=st.data())
def test_mutated_safetensors(folder, originals, data):
    original = originals["safetensors"]
    blob = mutate(original, data.draw(mutations(len(original))))
    path = folder / "m.safetensors"
    path.write_bytes(blob)
    result, peak = measured(lambda: read_checkpoint(path))
    assert peak <= 2 * DECLARED, peak
    try:
        reference = st_load(blob)
    except (SafetensorError, ValueError, OverflowError):
        reference = None
    if isinstance(result, CheckpointError):
        event("refused")
        assert "\n" not in str(result)
        return
    assert not isinstance(result, Exception), f"{type(result).__name__}: {result}"
    assert reference is not None, "loaded a file the safetensors library refuses"
    event("loaded, identical" if same_tensors(result, ARRAYS) else "loaded, tensor bytes changed")
    assert same_tensors(result, reference)


@SETTINGS
@given(data=st.data())
def test_mutated_torch_bin(folder, originals, data):
    original = originals["bin"]
    blob = mutate(original, data.draw(mutations(len(original))))
    path = folder / "m.bin"
    path.write_bytes(blob)
    result, peak = measured(lambda: read_checkpoint(path))
    assert peak <= 2 * DECLARED, peak
    if isinstance(result, CheckpointError):
        event("refused")
        assert "\n" not in str(result)
        return
    assert not isinstance(result, Exception), f"{type(result).__name__}: {result}"
    event("loaded")
    assert same_tensors(result, ARRAYS) and list(result) == list(ARRAYS), "a mutated .bin loaded different tensors"


@SETTINGS
@given(data=st.data())
def test_mutated_hub_config(folder, originals, data):
    original = originals["hub_config"]
    path = folder / "config.json"
    path.write_bytes(mutate(original, data.draw(mutations(len(original)))))
    result, _ = measured(lambda: ShowoConfig.from_hub_dict(read_json(path)))
    if isinstance(result, ShowoConfigError):
        event("refused")
        assert "\n" not in str(result)
        return
    event("loaded")
    assert not isinstance(result, Exception), f"{type(result).__name__}: {result}"
    assert ShowoConfig.from_dict(result.to_dict()) == result  # it passes the schema again, unchanged


@SETTINGS
@given(data=st.data())
def test_mutated_converted_config(folder, originals, data):
    original = originals["converted_config"]
    model = folder / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_bytes(mutate(original, data.draw(mutations(len(original)))))
    result, _ = measured(lambda: read_model_config(model))
    if isinstance(result, ShowoConfigError):
        event("refused")
        assert "\n" not in str(result)
        return
    event("loaded")
    assert not isinstance(result, Exception), f"{type(result).__name__}: {result}"
    showo = ShowoConfig.from_dict(result["showo"])
    assert ShowoConfig.from_dict(showo.to_dict()) == showo
    if "magvit" in result:  # (a folder without one is refused when MAGVIT is loaded)
        assert MagvitConfig.from_dict(result["magvit"]).codebook_size == showo.codebook_size


SMALL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([7, -1], np.int64)}


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_every_single_bit_flip_of_a_small_file(folder, fmt):
    """Exhaustive complement to the random search: each byte of a small file flipped in turn."""
    path = folder / f"small.{fmt}"
    if fmt == "bin":
        tf.save_torch(path, SMALL, metadata=True)
    else:
        save_file(SMALL, str(path))
    original = path.read_bytes()
    outcomes = {"refused": 0, "loaded": 0}
    for pos in range(len(original)):
        blob = bytearray(original)
        blob[pos] ^= 0x10
        path.write_bytes(bytes(blob))
        try:
            got = read_checkpoint(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            outcomes["refused"] += 1
            continue
        want = SMALL if fmt == "bin" else st_load(bytes(blob))  # the library must accept it too
        assert same_tensors(got, want), pos
        outcomes["loaded"] += 1
    assert min(outcomes.values()) > 20, outcomes  # both outcomes really occur
