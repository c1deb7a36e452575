"""`showo bench` machinery, the size arithmetic behind the 4-bit targets, low-RAM mode and the
OpenBLAS launcher. Nothing here asserts a time: only that the measurements run, agree and add up."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import typer
from safetensors.numpy import save_file
from typer.testing import CliRunner

from conftest import REF
from showo_mlx import bench, launcher, memory
from showo_mlx.config import MagvitConfig, ShowoConfig
from showo_mlx.convert import QuantizeSpec, convert
from showo_mlx.magvit import MagvitV2
from showo_mlx.model import ShowoTransformer


def bench_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root():  # a group, so the command is addressed by name as in `showo bench`
        pass

    bench.register(app)
    return app


# -- the command ------------------------------------------------------------------------------------
def test_bench_command_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_app(), ["bench", "--tiny", "--steps", "2", "--tokens", "5", "--json", str(out)])
    assert result.exit_code == 0, result.output
    for row in ("t2i step, N=64, CFG (2 measured)", "t2i image, 18 steps + decode, est.", "ask prefill",
                "ask per token (5 tokens; recompute all 5)", "MAGVIT encode 128 px", "MAGVIT decode 128 px",
                "t2i greedy codes identical", "ask greedy tokens identical 5/5"):
        assert row in " ".join(result.output.split()), row
    data = json.loads(out.read_text())
    assert set(data) >= {"meta", "model", "t2i", "ask", "magvit"}
    assert data["t2i"]["step_ratio"] > 0 and data["ask"]["token_ratio"] > 0
    assert len(data["t2i"]["cached"]["steps_s"]) == len(data["t2i"]["recompute"]["steps_s"]) == 2
    assert data["model"]["transformer_params"] == bench.param_count(ShowoTransformer(bench.tiny_configs()[0]))


def test_bench_sizes_and_bad_options():
    app = bench_app()
    sizes = CliRunner().invoke(app, ["bench", "--sizes"])
    assert sizes.exit_code == 0 and "float16   128      4-bit" in sizes.output
    for args in (["--random", "300"], ["--only", "video"], ["--steps", "0"], ["--tokens", "1"], ["-q", "--q-bits", "7"],
                 ["--q-bits", "4"], ["--random", "tiny"]):
        r = CliRunner().invoke(app, ["bench", *args])
        assert r.exit_code == 2 and r.output.startswith("error:"), (args, r.output)


@pytest.mark.parametrize("script,present,absent", [("bench_ask.py", "ask per token", "t2i step"),
                                                    ("bench_t2i.py", "t2i step", "ask per token")])
def test_benchmark_scripts_run_one_phase(script, present, absent):
    import subprocess

    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    r = subprocess.run([sys.executable, str(path), "--tiny", "--steps", "1", "--tokens", "3"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert present in r.stdout and absent not in r.stdout and "MAGVIT encode" not in r.stdout


def test_cached_and_recompute_paths_agree_in_one_run():
    r = bench.run_bench(bench.BenchOptions(tiny=True, steps=4, tokens=12, recompute_tokens=None, phases=("t2i", "ask")))
    assert r["t2i"]["codes_identical"], r["t2i"]["codes_differing"]
    assert r["ask"]["tokens_identical"] and r["ask"]["tokens_agree"] == 12
    assert r["ask"]["recompute"]["positions"] == list(range(12))
    for part in ("cached", "recompute"):
        assert r["t2i"][part]["peak_bytes"] >= r["model"]["transformer_bytes"]


def test_low_ram_run_agrees(restore_limits):
    r = bench.run_bench(bench.BenchOptions(tiny=True, steps=2, tokens=4, low_ram=True))
    assert r["meta"]["low_ram"]["cache_limit"] == memory.LOW_RAM_CACHE_BYTES
    assert r["t2i"]["codes_identical"] and r["ask"]["tokens_identical"]
    assert "low RAM" in bench.format_table(r)


def test_recompute_positions_are_evenly_spread():
    assert bench.recompute_positions(100, None) == list(range(100))
    assert bench.recompute_positions(5, 10) == list(range(5))
    picked = bench.recompute_positions(100, 10)
    assert picked[0] == 0 and picked[-1] == 99 and len(picked) == 10
    assert max(np.diff(picked)) - min(np.diff(picked)) <= 1


def test_synthetic_prompting_builds_the_real_shapes():
    cfg = ShowoConfig()
    p = bench.SyntheticPrompting(cfg)
    t2i = p.t2i_gen([bench.PROMPT], np.full((1, 256), cfg.mask_token_id))
    assert t2i.ids.shape == (1, 129 + 1 + 256 + 1) and t2i.ids.max() < cfg.vocab_size
    mmu = p.mmu_gen(np.full((1, 256), cfg.image_token_offset), bench.QUESTION)
    assert mmu.layouts[0].prefix_len == 256 + 3  # mmu, soi, image, eoi: bidirectional


# -- sizes: the arithmetic behind the 4-bit folder target -------------------------------------------
def test_size_arithmetic_matches_the_real_model():
    cfg = ShowoConfig()
    assert bench.param_count(ShowoTransformer(cfg)) == 1_448_176_770  # the official Showo's parameter count
    assert bench.expected_transformer_bytes(cfg, None, "float32") == 5_792_707_080  # its 437 float32 tensors
    rows = {(r["scales"], r["group_size"], r["head_bits"]): r for r in bench.size_table()}
    assert len(rows) == 18
    best = rows[("float16", 128, 4)]
    assert best["folder_bytes"] == min(r["folder_bytes"] for r in rows.values())


def official_checkpoint(folder: Path, cfg: ShowoConfig, seed: int = 0) -> None:
    """A random checkpoint in the official layout (pytorch_model.safetensors, Showo key names)."""
    rng = np.random.default_rng(seed)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {"showo.model.embed_tokens.weight": (v, h), "showo.model.final_layernorm.weight": (h,),
              "showo.model.final_layernorm.bias": (h,), "showo.lm_head.weight": (v, h), "showo.lm_head.bias": (v,)}
    for i in range(cfg.num_hidden_layers):
        p = f"showo.model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "dense"):
            shapes[f"{p}self_attn.{name}.weight"], shapes[f"{p}self_attn.{name}.bias"] = (h, h), (h,)
        for name in ("q_layernorm", "k_layernorm"):
            shapes[f"{p}self_attn.{name}.weight"] = shapes[f"{p}self_attn.{name}.bias"] = (cfg.head_dim,)
        shapes[f"{p}mlp.fc1.weight"], shapes[f"{p}mlp.fc1.bias"] = (f, h), (f,)
        shapes[f"{p}mlp.fc2.weight"], shapes[f"{p}mlp.fc2.bias"] = (h, f), (h,)
        shapes[f"{p}input_layernorm.weight"], shapes[f"{p}input_layernorm.bias"] = (h,), (h,)
    folder.mkdir(parents=True)
    save_file({k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()},
              str(folder / "pytorch_model.safetensors"))
    hub = json.loads((REF / "showo" / "config.json").read_text())
    hub["llm_config"].update(hidden_size=h, intermediate_size=f, num_attention_heads=cfg.num_attention_heads,
                             num_hidden_layers=cfg.num_hidden_layers)
    (folder / "config.json").write_text(json.dumps(hub))


def tensor_bytes(path: Path) -> int:
    """Bytes of a safetensors file's tensor data (the file minus its length field and JSON header)."""
    with open(path, "rb") as fh:
        (header,) = struct.unpack("<Q", fh.read(8))
    return path.stat().st_size - 8 - header


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """hidden 256, 2 layers, the fixture's vocabulary (its tokenizer fits)."""
    hub = json.loads((REF / "showo" / "config.json").read_text())
    cfg = ShowoConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
                      vocab_size=hub["vocab_size"], llm_vocab_size=hub["llm_vocab_size"],
                      codebook_size=hub["codebook_size"], num_vq_tokens=hub["num_vq_tokens"],
                      mask_token_id=hub["mask_token_id"]).validate()
    src = tmp_path_factory.mktemp("official") / "small"
    official_checkpoint(src, cfg)
    return src, cfg


@pytest.mark.parametrize("dtype,group,head_bits", [("float16", 128, 4), ("float16", 64, None), ("float32", 32, 8)])
def test_quantized_folder_size_matches_bits_per_weight(tmp_path, small_checkpoint, dtype, group, head_bits):
    src, cfg = small_checkpoint
    spec = QuantizeSpec(4, group, head_bits)
    dst = convert(src, tmp_path / "q4", dtype=dtype, quantize=spec, vq=REF / "magvitv2", tokenizer=REF / "tokenizer",
                  log=lambda m: None)
    item = 2 if dtype == "float16" else 4
    # Per Linear (out, in): 4 bits per weight + a scale and a bias per group, in the model dtype.
    bpw = 4 + 2 * 8 * item / group
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    body = cfg.num_hidden_layers * (4 * h * h + 2 * h * f)
    heads = 2 * v * h
    head_bpw = 8 * item if head_bits is None else head_bits + 2 * 8 * item / group
    vectors = bench.param_count(ShowoTransformer(cfg)) - body - heads  # biases and LayerNorms stay float
    expected = body * bpw / 8 + heads * head_bpw / 8 + vectors * item
    assert tensor_bytes(dst / "model.safetensors") == expected == bench.expected_transformer_bytes(cfg, spec, dtype)
    vq = MagvitV2(MagvitConfig.from_hub_dict(json.loads((REF / "magvitv2" / "config.json").read_text())))
    assert tensor_bytes(dst / "magvit.safetensors") == bench.param_count(vq) * 2  # MAGVIT float16


# -- low-RAM mode -------------------------------------------------------------------------------------
def test_throttled_evaluation_gives_identical_outputs_and_restores_the_limit(restore_limits):
    cfg = bench.tiny_configs()[1]
    vq = MagvitV2(cfg, with_encoder=True)
    mx.eval(vq.parameters())
    codes = mx.array(np.random.default_rng(0).integers(0, cfg.codebook_size, (1, 64)))
    free = np.array(vq.decode(codes))
    before = mx.get_memory_limit()
    with memory.throttled(headroom=0):  # every operation waits for the previous one
        assert mx.get_memory_limit() <= memory.active_bytes()
        throttled = np.array(vq.decode(codes))
    assert mx.get_memory_limit() == before
    assert np.array_equal(throttled, free)
    with memory.throttled(enabled=False):
        assert mx.get_memory_limit() == before
    memory.drop_encoder(vq)
    assert not vq.has_encoder
    assert np.array_equal(np.array(vq.decode(codes)), free)


# -- the OpenBLAS launcher ----------------------------------------------------------------------------
from test_launcher import Exec  # noqa: E402 - the launcher tests' execve recorder
from test_launcher import recorder as fake_execve  # noqa: E402


@pytest.fixture
def linux_with_openblas(monkeypatch, tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("SHOWO_OPENBLAS_LIB", str(lib))
    return str(lib)


def test_launcher_reexecs_once_with_openblas_when_asked(linux_with_openblas, monkeypatch):
    calls = []
    argv = ["showo", "--openblas", "bench"]
    env = {"PATH": "/bin", "LD_PRELOAD": "/x/other.so", "SHOWO_OPENBLAS_LIB": linux_with_openblas}
    with pytest.raises(Exec):
        launcher.prepare_process(argv, env, execve=fake_execve(calls))
    assert argv == ["showo", "bench"]  # the CLI never sees the flag
    _, child, child_env = calls[0]
    assert "--openblas" not in child
    assert child_env["LD_PRELOAD"] == f"{linux_with_openblas}:/x/other.so"
    assert child_env[launcher.ENV_DONE] == "1"
    # the child (marker set) and a user preload never re-exec again
    launcher.prepare_process(["showo"], child_env, execve=fake_execve(calls))
    launcher.prepare_process(["showo"], {"SHOWO_OPENBLAS": "1", "LD_PRELOAD": "/l/libopenblas.so"}, execve=fake_execve(calls))
    assert len(calls) == 1


def test_launcher_respects_the_users_core_type_and_opt_in(linux_with_openblas):
    calls = []
    env = {"SHOWO_OPENBLAS": "1", "OPENBLAS_CORETYPE": "Zen", "SHOWO_OPENBLAS_LIB": linux_with_openblas}
    with pytest.raises(Exec):
        launcher.prepare_process(["showo", "bench"], env, execve=fake_execve(calls))  # bare `showo` only prints help
    assert calls[0][2]["OPENBLAS_CORETYPE"] == "Zen"
    launcher.prepare_process(["showo", "bench"], {"SHOWO_OPENBLAS": "0"}, execve=fake_execve(calls))
    assert len(calls) == 1  # on by default now (tests/test_launcher.py); SHOWO_OPENBLAS=0 turns it off


def test_launcher_is_a_no_op_off_linux_or_without_the_library(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sys, "platform", "darwin")
    launcher.prepare_process(["showo", "--openblas"], {}, execve=fake_execve(calls))
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(launcher, "find_openblas", lambda: None)
    monkeypatch.setattr(launcher, "_hint_shown", False)  # the hint is once per process; earlier tests may have shown it
    argv = ["showo", "--openblas", "ask"]
    launcher.prepare_process(argv, {}, execve=fake_execve(calls))
    assert not calls and argv == ["showo", "ask"]
    assert launcher.INSTALL_HINT in capsys.readouterr().err


def test_blas_status_names_a_backend():
    status = launcher.blas_status()
    assert status.startswith(("CPU", "Metal"))
    hint = launcher.slow_blas_hint()
    assert hint is None or "--openblas" in hint
