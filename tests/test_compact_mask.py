"""The smallest exact SDPA mask: none, a (B, 1, 1, Lk) key mask, or the full (B, 1, Lq, Lk) mask.

* OmniMask's forms agree with `Layout.allowed` on random layouts of every kind;
* the MaskGIT hot loop (prefix-cached image logits) uses the key mask and builds no Lq × Lk array
  per window or step, and gives the same logits as the full mask (within 1e-6) and the same codes
  on every deterministic fixture run of the official `t2i_generate`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import load_npz
from showo_mlx import attention
from showo_mlx.attention import OmniMask, attention_mask
from showo_mlx.doctor import CASE_KINDS, make_case
from showo_mlx.layout import Layout, batch_allowed
from showo_mlx.prompting import Prompt
from showo_mlx.t2i import CachedImageLogits, UncondPrefixStore

MG = load_npz("maskgit")
DETERMINISTIC_RUNS = ["nocfg_T8", "nocfg_T12", "cfg_T8", "cfg_T12", "inpaint_T8", "inpaint_T12"]


class FullMask(OmniMask):
    """The same rule always handed to SDPA as the (B, 1, Lq, Lk) mask (what the code did before)."""

    def sdpa_mask(self) -> mx.array:
        return self.array


def test_mask_forms_agree_with_the_rule():
    rng = np.random.default_rng(3)
    uniform = 0
    for i in range(300):
        case = make_case(CASE_KINDS[i % len(CASE_KINDS)], rng, max_len=60)
        want = batch_allowed(case.layouts, case.q_start, case.q_end)[:, :, : case.key_len]
        mask = attention_mask(case.layouts, case.q_start, case.q_end, case.key_len)
        if mask is None:
            assert want.all(), case
            continue
        assert not want.all()
        np.testing.assert_array_equal(np.array(mask.array)[:, 0], want)
        rows_equal = bool((want == want[:, :1]).all())
        if mask.uniform_rows:
            uniform += 1
            assert rows_equal
            assert mask.key_mask.shape == (len(case.layouts), 1, 1, case.key_len)
            np.testing.assert_array_equal(np.broadcast_to(np.array(mask.key_mask)[:, 0], want.shape), want)
            assert mask.sdpa_mask() is mask.key_mask
        else:
            assert mask.sdpa_mask() is mask.array
            with pytest.raises(ValueError):
                mask.key_mask
    assert uniform >= 40  # the hot-loop and decode kinds are exercised


@pytest.fixture(scope="module")
def fixture_runs(prompting, cases):
    texts = [cases["prompts"][i]["text"] for i in cases["maskgit"]["prompt_indices"]]
    n = cases["ids"]["num_vq_tokens"]
    out = []
    for run in DETERMINISTIC_RUNS:
        ids = MG[f"{run}.input_ids"]
        image = slice(ids.shape[1] - n - 1, ids.shape[1] - 1)
        guidance = 0.0 if run.startswith("nocfg") else cases["maskgit"]["runs"][run]["guidance_scale"]
        assert prompting.t2i_gen(texts, ids[:, image]).ids.tolist() == ids.tolist()
        out.append((run, Prompt(ids, prompting.t2i_layouts(ids)), ids[:, image], guidance))
    return out


def test_hot_loop_compact_mask_equals_full_mask_on_fixture_runs(pipe, prompting, cases, fixture_runs):
    """Every deterministic fixture run, at its first and last recorded window: the compact
    key mask gives the full mask's logits within 1e-6 and the same greedy codes. (The whole runs,
    through this same default path, reproduce the official codes in test_pipeline.py.)"""
    b = len(MG["cfg_T8.result"])
    image = fixture_runs[0][2].shape[1]
    padded = 0
    store = UncondPrefixStore()  # the unconditional prefix once, as a loaded pipeline does
    for run, cond, _, guidance in fixture_runs:
        compact = CachedImageLogits(pipe.model, prompting, cond, guidance, store)
        m = compact.mask
        if m is None:  # no pads in any row: nothing is masked, both paths are the same
            continue
        padded += 1
        assert m.uniform_rows and m.key_mask.shape == (m.shape[0], 1, 1, m.k_end)
        full = CachedImageLogits.__new__(CachedImageLogits)
        full.__dict__.update(compact.__dict__)  # the same prefix caches, the mask handed over in full
        full.mask = FullMask(m.layouts, m.q_start, m.q_end, m.k_end)
        windows = MG[f"{run}.model_inputs"][:, :b, -image - 1 : -1]
        for s in (0, len(windows) - 1):
            a, f = compact(mx.array(windows[s])), full(mx.array(windows[s]))
            assert mx.abs(a - f).max().item() <= 1e-6, (run, s)
            assert (mx.argmax(a, -1) == mx.argmax(f, -1)).all().item(), (run, s)
        assert compact.mask._array is None  # the compact loop never built the Lq x Lk mask
    assert padded >= 4  # the CFG and padded-prompt runs exercise the key mask


def test_hot_loop_builds_no_host_mask_per_window(pipe, prompting, fixture_runs, monkeypatch):
    """The text prefixes are prefill (their text x text mask is built once per prompt); the image
    queries' mask and every MaskGIT step (window) use O(L) flag bytes only."""
    run, cond, init, guidance = fixture_runs[2]  # cfg_T8: padded prompts and the unconditional prompt
    fn = CachedImageLogits(pipe.model, prompting, cond, guidance)

    def forbidden(*args, **kwargs):
        raise AssertionError("an Lq x Lk mask was built in the hot loop")

    monkeypatch.setattr(attention, "batch_allowed", forbidden)
    monkeypatch.setattr(Layout, "allowed", forbidden)
    before = OmniMask.materialised
    mask = attention_mask(fn.mask.layouts, fn.mask.q_start, fn.mask.q_end, fn.mask.k_end)  # as __init__ builds it
    assert mask.uniform_rows
    for _ in range(3):
        mx.eval(fn(mx.array(init)))
    assert OmniMask.materialised == before


def test_bench_attention_prints_the_compact_mask_rows(monkeypatch, capsys):
    """benchmarks/bench_attention.py on a small shape: the hot loop's full, compact and pad-dropped
    SDPA rows, the compact ones equal to the full-mask result."""
    import importlib.util
    import re
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["bench_attention.py", "--lengths", "200", "--heads", "2", "--repeats", "1", "--prompt-pads", "30"])
    module.main()
    out = capsys.readouterr().out
    for call in ("prefill, rows differ, full mask", "hot loop, full mask", "hot loop, compact key mask (B,1,1,Lk)",
                 "hot loop, compact, 30 common pad keys dropped"):  # fmt: skip
        assert call in out, out
    compact = [line for line in out.splitlines() if "hot loop, compact" in line]
    assert len(compact) == 2 and " 71x200 " in compact[0] and " 71x170 " in compact[1]
    for line in compact:
        assert float(re.search(r"sdpa (\S+)$", line).group(1)) <= 1e-6
