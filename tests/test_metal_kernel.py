"""The Metal omni-attention kernel, checked where no Metal exists.

1. A NumPy emulation of the kernel's per-thread index arithmetic (tests/metal_emulation.py) runs
   over the exact buffers the host code builds (`metal_attention.launch_spec`) for > 200 random
   layouts and must equal the float64 reference: an indexing bug in tiles, fragments, staging,
   flags or the (B, L, H, D) output shows up here before any Mac runs the kernel.
2. The Metal source MLX generates for a launch (captured with `mx.export_function`, which records
   custom kernels without Metal since MLX 0.32, and printed with `verbose=True`) carries the
   template values, buffer kinds and thread attributes the host code assumes.
3. The host asserts every threadgroup-size assumption.
On Apple silicon the kernel itself also runs against the reference (skipped elsewhere).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import mlx.core as mx

from metal_emulation import FC, FR, emulate, frag_elements, frag_matrix
from showo_mlx.doctor import CASE_KINDS, make_case, reference_attention
from showo_mlx.errors import AttentionBackendError
from showo_mlx.kernels import make_block_plan, metal_attention
from showo_mlx.kernels.metal_attention import BLOCK_K, BLOCK_Q, KernelConfig, launch_spec
from showo_mlx.layout import Layout, t2i_layout

SCALE = 0.125
NO_METAL = pytest.mark.skipif(
    metal_attention.metal_unavailable_reason() is not None,
    reason=f"needs the Metal GPU as MLX's default device: {metal_attention.metal_unavailable_reason()}",
)


def _qkv(batch, heads, q_len, k_len, seed, dtype):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((batch, heads, n, 64)).astype(np.float32) for n in (q_len, k_len, k_len)]
    return [mx.array(a).astype(dtype) for a in arrays]


def _spec_np(spec: dict) -> dict:
    """The launch spec with its input buffers as NumPy arrays (what the GPU would read)."""
    spec = dict(spec)
    spec["inputs_np"] = [np.array(x.astype(mx.float32) if x.dtype in (mx.float16, mx.bfloat16) else x) for x in spec["inputs"]]
    return spec


def _arbitrary(rng, length: int) -> Layout:
    def spans(n):
        out = []
        for _ in range(n):
            a = int(rng.integers(0, length + 1))
            out.append((a, int(rng.integers(a, length + 1))))
        return tuple(out)

    prefix = int(rng.integers(0, length + 1)) if rng.random() < 0.4 else 0
    return Layout(length, spans(int(rng.integers(0, 3))), spans(int(rng.integers(0, 3))), prefix, spans(int(rng.integers(0, 2))))


def _layouts(count: int, seed: int):
    """Show-o's call kinds (as `showo doctor` draws them) and arbitrary Layouts, several blocks long."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if i % 5 == 4:
            length = int(rng.integers(3, 100))
            layouts = tuple(_arbitrary(rng, length) for _ in range(int(rng.integers(1, 4))))
            q_start = int(rng.integers(0, length))
            q_end = int(rng.integers(q_start + 1, length + 1))
            out.append((layouts, q_start, q_end, int(rng.integers(q_end, length + 1))))
        else:
            c = make_case(CASE_KINDS[i % len(CASE_KINDS)], rng, max_len=100)
            out.append((c.layouts, c.q_start, c.q_end, c.key_len))
    return out


# -- the lane layout the kernel relies on ----------------------------------------------------------
def test_fragment_lane_layout_covers_each_cell_once():
    cells = {(int(r), int(c) + e) for r, c in zip(FR, FC) for e in (0, 1)}
    assert len(cells) == 64 and cells == {(r, c) for r in range(8) for c in range(8)}
    m = np.arange(64.0).reshape(8, 8)
    np.testing.assert_array_equal(frag_matrix(frag_elements(m)), m)
    # The 4 lanes holding one row are lane, lane^1, lane^8, lane^9: the two shuffles of the kernel.
    for lane in range(32):
        assert {FR[lane ^ x] for x in (1, 8, 9)} == {FR[lane]}
        assert len({lane ^ x for x in (0, 1, 8, 9)} & set(np.flatnonzero(FR == FR[lane]))) == 4


# -- 1. the emulation over the host's buffers ---------------------------------------------------
@pytest.mark.parametrize("part", range(4))
def test_kernel_emulation_matches_reference(part):
    """216 layouts in four parts (54 each): float32 within 1e-5, float16 within 2e-3 relative."""
    for n, (layouts, q_start, q_end, key_len) in enumerate(_layouts(54, seed=100 + part)):
        dtype = mx.float16 if n % 3 == 2 else mx.float32
        heads = 2 if n % 4 == 1 else 1
        q, k, v = _qkv(len(layouts), heads, q_end - q_start, key_len, n, dtype)
        plan = make_block_plan(layouts, q_start, q_end, key_len, BLOCK_Q, BLOCK_K)
        spec = _spec_np(launch_spec(q, k, v, plan, SCALE))
        out_dtype = np.float16 if dtype == mx.float16 else np.float32
        got = emulate(spec, out_dtype).reshape(spec["output_shapes"][0]).transpose(0, 2, 1, 3)
        ref = reference_attention(q, k, v, layouts, q_start, SCALE)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err <= (2e-3 if dtype == mx.float16 else 1e-5), (n, layouts, q_start, q_end, key_len, err)


def test_emulation_catches_a_packing_bug():
    """The emulation is sensitive to the buffers: drop the PARTIAL bit of the packed tiles (the
    element rule is then skipped) and the result is wrong."""
    layouts = (t2i_layout(90, 7, 40, 89), t2i_layout(90, 37, 40, 89))
    q, k, v = _qkv(2, 1, 90, 90, 0, mx.float32)
    plan = make_block_plan(layouts, 0, 90, 90, BLOCK_Q, BLOCK_K)
    spec = _spec_np(launch_spec(q, k, v, plan, SCALE))
    ref = reference_attention(q, k, v, layouts, 0, SCALE)
    good = emulate(spec).reshape(2, 90, 1, 64).transpose(0, 2, 1, 3)
    assert np.abs(good - ref).max() <= 1e-5
    spec["inputs_np"][3] = spec["inputs_np"][3] & ~1  # tiles: every entry FULL
    bad = emulate(spec).reshape(2, 90, 1, 64).transpose(0, 2, 1, 3)
    assert np.abs(bad - ref).max() > 0.05


def test_small_plan_buffers_stay_in_device_memory():
    """MLX passes inputs with fewer than 8 elements as `constant`; the kernel reads tiles, counts and
    flags as `device`, so the host pads them; params (6) and scale (1) are `constant`."""
    q, k, v = _qkv(1, 1, 1, 3, 0, mx.float32)
    plan = make_block_plan([t2i_layout(3, 0, 1, 2)], 2, 3, 3, BLOCK_Q, BLOCK_K)
    tiles, counts, flags, params, scale = launch_spec(q, k, v, plan, SCALE)["inputs"][3:]
    assert min(tiles.size, counts.size, flags.size) >= metal_attention.MIN_DEVICE_ELEMENTS
    assert params.size < metal_attention.MIN_DEVICE_ELEMENTS and scale.size == 1
    assert params.tolist() == [1, 1, 3, 2, 3, 1]


# -- 2. the generated Metal source -------------------------------------------------------------
def _export_kernel(capfd, dtype, shape=(2, 3, 45, 70), q_start=25):
    """The CustomKernel primitive MLX records for one launch, and what verbose=True printed."""
    b, h, lq, lk = shape
    layouts = [t2i_layout(lk, 4, q_start, lk - 1), t2i_layout(lk, q_start - 2, q_start, lk - 1)][:b]
    q, k, v = _qkv(b, h, lq, lk, 0, dtype)
    plan = make_block_plan(layouts, q_start, q_start + lq, lk, BLOCK_Q, BLOCK_K)
    records = []
    capfd.readouterr()
    # A callback receives the traced graph (inputs, outputs, each primitive with its arguments).
    mx.export_function(records.append, lambda q, k, v: metal_attention.launch(q, k, v, plan, SCALE, verbose=True), q, k, v)
    printed = capfd.readouterr().out
    (prim,) = [r for r in records if r.get("type") == "primitive" and r.get("name") == "CustomKernel"]
    return prim, printed, launch_spec(q, k, v, plan, SCALE)


@pytest.mark.parametrize("dtype, type_name", [(mx.float32, "float"), (mx.float16, "float16_t"), (mx.bfloat16, "bfloat16_t")])
def test_generated_source_matches_host(capfd, dtype, type_name):
    prim, printed, spec = _export_kernel(capfd, dtype)
    name, source, *rest = prim["arguments"]
    assert source in printed  # verbose=True printed the very source that was recorded

    # Template values, in the order the host passes them.
    values = [type_name if isinstance(v, mx.Dtype) else str(v) for _, v in spec["template"]]
    assert f"<{', '.join(values)}>" in source
    assert re.search(r"template <typename T, int HEAD_D, int BQ, int BK, int NSG, int VEC, int PAD_T>", source)

    # Buffer kinds and order: q, k, v, tiles, counts, flags in device memory; params, scale constant.
    start = source.index("[[kernel]]")
    signature = source[start : source.index(") {", start)]
    buffers = re.findall(r"(const (?:device|constant)|device) (\w+)\* (\w+) \[\[buffer\((\d+)\)\]\]", signature)
    assert buffers == [
        ("const device", type_name, "q", "0"), ("const device", type_name, "k", "1"), ("const device", type_name, "v", "2"),
        ("const device", "int32_t", "tiles", "3"), ("const device", "int32_t", "counts", "4"),
        ("const device", "uint8_t", "flags", "5"), ("const constant", "int32_t", "params", "6"),
        ("const constant", "float", "scale", "7"), ("device", type_name, "out", "8"),
    ]  # fmt: skip
    # Exactly the thread attributes the kernel reads, nothing MLX would add for a stray name.
    attributes = re.findall(r"\[\[(\w+)\]\]", signature.split("[[buffer(8)]]")[1])
    assert sorted(attributes) == sorted(metal_attention.THREAD_ATTRIBUTES)
    # Grid and threadgroup as the host computed them: one threadgroup per (query block, head, row).
    grid, threadgroup = tuple(rest[0:3]), tuple(rest[3:6])
    assert grid == spec["grid"] == (128 * 2, 3, 2) and threadgroup == spec["threadgroup"] == (128, 1, 1)
    assert prim["outputs"][0][1] == (2, 45, 3, 64)  # (B, Lq, H, D)
    assert "INFINITY" not in source and "-3.0e38f" in source  # finite minimum, safe under fast math


def test_source_names_no_unintended_attributes():
    """MLX adds a thread attribute whenever its name occurs in the source, comments included."""
    for name in ("thread_position_in_grid", "threads_per_grid", "threads_per_threadgroup", "grid_size",
                 "threadgroups_per_grid", "simdgroups_per_threadgroup", "thread_execution_width",
                 "thread_position_in_threadgroup", "threads_per_simdgroup", "quadgroup_index_in_threadgroup",
                 "thread_index_in_threadgroup", "q_shape", "q_strides", "k_strides", "v_strides"):  # fmt: skip
        assert name not in metal_attention._SOURCE + metal_attention._HEADER
    for name in metal_attention.THREAD_ATTRIBUTES:
        assert name in metal_attention._SOURCE


# -- 3. host-side assertions -----------------------------------------------------------------------
def test_kernel_config_assertions():
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        config = KernelConfig(dtype, 64).check()
        assert config.threads == 128 and config.block_q == 32
        assert config.threadgroup_bytes <= metal_attention.MAX_THREADGROUP_BYTES
    for bad, words in [
        (KernelConfig(mx.float32, 80), "head dim 80"),
        (KernelConfig(mx.float32, 64, block_q=16), "block_q 16"),
        (KernelConfig(mx.float32, 64, block_k=12), "multiples of 8"),
        (KernelConfig(mx.int32, 64), "dtype"),
        (KernelConfig(mx.float32, 64, block_k=256), "threadgroup memory"),
    ]:
        with pytest.raises(AttentionBackendError, match=words):
            bad.check()
    plan = make_block_plan([t2i_layout(40, 2, 10, 39)], 0, 40, 40, 16, 32)
    with pytest.raises(ValueError, match="blocks"):
        metal_attention.launch_config(plan, 1, KernelConfig(mx.float32, 64))


# -- the kernel on Apple silicon ---------------------------------------------------------------
@NO_METAL
@pytest.mark.parametrize("dtype, tol", [(mx.float32, 1e-5), (mx.float16, 2e-3), (mx.bfloat16, 1.6e-2)])
def test_metal_kernel_matches_reference(dtype, tol):
    for n, (layouts, q_start, q_end, key_len) in enumerate(_layouts(60, seed=7)):
        q, k, v = _qkv(len(layouts), 2, q_end - q_start, key_len, n, dtype)
        out = metal_attention.omni_attention_metal(q, k, v, layouts, q_start, SCALE)
        ref = reference_attention(q, k, v, layouts, q_start, SCALE)
        got = np.array(out.astype(mx.float32))
        assert np.abs(got - ref).max() / np.abs(ref).max() <= tol, (n, layouts, q_start)
