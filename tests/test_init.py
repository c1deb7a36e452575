"""`showo init`: Show-o's stage-1 starting model from a Phi checkpoint in transformers' layout
(models/modeling_showo.py `Showo.__init__` with load_from_showo=False + resize_token_embeddings),
and the stage presets that chain from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import REF
from safetensors.numpy import save_file
from typer.testing import CliRunner

from showo_mlx.errors import ShowoError, TrainingConfigError

HIDDEN, HEADS, LAYERS, FFN, PHI_ROWS = 128, 2, 2, 256, 512  # 512 rows > the 499-token tokenizer, like 51200 > 50295
STD = 0.05  # not transformers' default 0.02: proves initializer_range is read from config.json
CODEBOOK, RESOLUTION = 64, 128  # the fixture MAGVIT-v2: 2^6 codes, 128 px → 8×8 tokens
NEW_VOCAB = 499 + 10 + CODEBOOK + 1  # llm_vocab_size + [PAD] and 9 task tokens + codes + [MASK] = 574


def phi_config() -> dict:
    """transformers' PhiConfig for a tiny phi-1_5 (the real one: 2048 / 32 / 24 / 8192 / 51200)."""
    return {
        "architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_size": HIDDEN, "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS, "intermediate_size": FFN, "vocab_size": PHI_ROWS, "num_key_value_heads": HEADS,
        "hidden_act": "gelu_new", "initializer_range": STD, "layer_norm_eps": 1e-5, "max_position_embeddings": 2048,
        "partial_rotary_factor": 0.5, "qk_layernorm": False, "rope_theta": 10000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": None, "eos_token_id": None,
    }


def phi_tensors(seed: int = 1) -> dict[str, np.ndarray]:
    """Every tensor of HF `PhiForCausalLM` (no QK-LayerNorm), float16 like phi-1_5's model.safetensors."""
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (PHI_ROWS, HIDDEN), "model.final_layernorm.weight": (HIDDEN,),
              "model.final_layernorm.bias": (HIDDEN,), "lm_head.weight": (PHI_ROWS, HIDDEN), "lm_head.bias": (PHI_ROWS,)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "dense"):
            shapes[f"{p}self_attn.{proj}.weight"], shapes[f"{p}self_attn.{proj}.bias"] = (HIDDEN, HIDDEN), (HIDDEN,)
        shapes.update({f"{p}mlp.fc1.weight": (FFN, HIDDEN), f"{p}mlp.fc1.bias": (FFN,), f"{p}mlp.fc2.weight": (HIDDEN, FFN),
                       f"{p}mlp.fc2.bias": (HIDDEN,), f"{p}input_layernorm.weight": (HIDDEN,), f"{p}input_layernorm.bias": (HIDDEN,)})
    return {k: (rng.standard_normal(s) * 0.1).astype(np.float16) for k, s in shapes.items()}


def make_phi(folder: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else phi_tensors(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or phi_config()))
    for item in (REF / "tokenizer").iterdir():  # phi-1_5's tokenizer file layout (the fixture's tiny BPE)
        shutil.copy(item, folder / item.name)
    return folder


def make_prepared(folder: Path, rows: int = 3) -> Path:
    """Prepared captions in `showo prepare`'s documented layout (docs/TRAINING.md §2) with random
    codes: what `showo prepare` writes, without spending seconds on the MAGVIT encoder."""
    from showo_mlx.train.prepare import FORMAT, INDEX, VERSION

    folder.mkdir(parents=True)
    codes = np.random.default_rng(0).integers(0, CODEBOOK, size=(rows, (RESOLUTION // 16) ** 2)).astype(np.uint16)
    np.save(folder / "codes-00000.npy", codes)
    captions = ["a red cat", "a blue bird over the lake", "two dogs in the park"][:rows]
    (folder / "meta-00000.jsonl").write_text("".join(json.dumps({"key": str(i), "caption": c}) + "\n" for i, c in enumerate(captions)))
    index = {"format": FORMAT, "version": VERSION, "kind": "captions", "resolution": RESOLUTION, "num_tokens": codes.shape[1],
             "codebook_size": CODEBOOK, "count": rows, "skipped": 0,
             "shards": [{"codes": "codes-00000.npy", "meta": "meta-00000.jsonl", "count": rows}]}
    (folder / INDEX).write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from showo_mlx.cli import app

    root = tmp_path_factory.mktemp("init")
    phi = make_phi(root / "phi")
    out = root / "stage1"
    result = CliRunner().invoke(app, ["init", str(phi), str(out), "--codebook-size", str(CODEBOOK), "--resolution",
                                      str(RESOLUTION), "--seed", "7", "--vq", str(REF / "magvitv2")])
    assert result.exit_code == 0, result.output
    return {"root": root, "phi": phi, "out": out, "weights": dict(mx.load(str(out / "model.safetensors")))}


def test_phi_weights_are_copied_bit_for_bit_and_qk_norms_are_fresh(built):
    source, ours = phi_tensors(), built["weights"]
    config = json.loads((built["out"] / "config.json").read_text())
    showo = config["showo"]
    assert (showo["vocab_size"], showo["llm_vocab_size"], showo["codebook_size"], showo["num_vq_tokens"], showo["mask_token_id"]) == \
        (NEW_VOCAB, 499, CODEBOOK, (RESOLUTION // 16) ** 2, NEW_VOCAB - 1)
    assert (showo["hidden_size"], showo["num_attention_heads"], showo["num_hidden_layers"]) == (HIDDEN, HEADS, LAYERS)
    assert config["init"]["seed"] == 7 and config["init"]["initializer_range"] == STD
    for name, value in source.items():
        key = name[len("model."):] if name.startswith("model.") else name
        got = np.array(ours[key])
        assert got.dtype == np.float32
        want = value.astype(np.float32)  # float16 → float32 is exact, as torch's from_pretrained upcast
        if name in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
            assert got.shape[0] == NEW_VOCAB
            got = got[:PHI_ROWS]  # rows 499..511 (Phi's padding rows) are copied too
        assert np.array_equal(got, want), name
    for i in range(LAYERS):
        for norm in ("q_layernorm", "k_layernorm"):
            assert np.array_equal(np.array(ours[f"layers.{i}.self_attn.{norm}.weight"]), np.ones(HIDDEN // HEADS, np.float32))
            assert np.array_equal(np.array(ours[f"layers.{i}.self_attn.{norm}.bias"]), np.zeros(HIDDEN // HEADS, np.float32))
    assert not np.array(ours["lm_head.bias"])[PHI_ROWS:].any()  # new head bias: 0
    assert len(ours) == len(source) + 4 * LAYERS  # nothing else


@pytest.mark.parametrize("key", ["embed_tokens.weight", "lm_head.weight"])
def test_new_rows_follow_phis_init(built, key):
    """transformers 4.41 `_init_weights` for Phi: normal(0, initializer_range).

    The new rows hold n = (574 - 512) · 128 = 7936 independent draws x ~ N(0, σ²), σ = 0.05.
    Tolerances are 5 standard errors of each statistic for that n (a correct init fails with
    probability < 1e-6; the seed is fixed, so the test is deterministic anyway):
      * sample mean: standard error σ/√n                  → |mean| < 5σ/√n        = 0.0028
      * sample std: standard error ≈ σ/√(2n) (normal data) → |std − σ| < 5σ/√(2n) = 0.0020 (4% of σ)
      * share of |x| < σ: p = 0.6827, binomial standard error √(p(1−p)/n) → ± 0.026. This rejects
        a uniform draw with the same std (share 0.577) and a hard-coded 0.02 (share 0.95)."""
    new = np.array(built["weights"][key])[PHI_ROWS:].astype(np.float64).ravel()
    n = new.size
    assert n == (NEW_VOCAB - PHI_ROWS) * HIDDEN
    assert abs(new.mean()) < 5 * STD / np.sqrt(n)
    assert abs(new.std() - STD) < 5 * STD / np.sqrt(2 * n)
    p = 0.6826894921370859  # P(|Z| < 1)
    assert abs(np.mean(np.abs(new) < STD) - p) < 5 * np.sqrt(p * (1 - p) / n)


def test_init_is_a_pure_function_of_its_seed(built, tmp_path):
    from showo_mlx.train.init import InitSpec, build_init

    spec = dict(source=str(built["phi"]), codebook_size=CODEBOOK, resolution=RESOLUTION, vq=str(REF / "magvitv2"))
    same = dict(mx.load(str(build_init(InitSpec(**spec, seed=7), tmp_path / "a", log=lambda m: None) / "model.safetensors")))
    other = dict(mx.load(str(build_init(InitSpec(**spec, seed=8), tmp_path / "b", log=lambda m: None) / "model.safetensors")))
    assert all(np.array_equal(np.array(same[k]), np.array(v)) for k, v in built["weights"].items())
    emb = np.array(other["embed_tokens.weight"])
    assert np.array_equal(emb[:PHI_ROWS], np.array(same["embed_tokens.weight"])[:PHI_ROWS])
    assert not np.array_equal(emb[PHI_ROWS:], np.array(same["embed_tokens.weight"])[PHI_ROWS:])


def test_init_fetches_only_phis_safetensors_and_tokenizer(built, tmp_path, monkeypatch):
    import huggingface_hub

    from showo_mlx.train.init import InitSpec, build_init

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):  # only the network is replaced
        calls.append((repo_id, allow_patterns))
        return str(built["phi"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = build_init(InitSpec("microsoft/phi-1_5", CODEBOOK, RESOLUTION, 7, str(REF / "magvitv2")), tmp_path / "hub", log=lambda m: None)
    repo, patterns = calls[0]
    assert repo == "microsoft/phi-1_5" and "model*.safetensors*" in patterns and "vocab.json" in patterns
    assert not any("bin" in p for p in patterns)  # phi-1_5's 2.8 GB of weights are read once, from safetensors
    weights = dict(mx.load(str(out / "model.safetensors")))
    assert all(np.array_equal(np.array(weights[k]), np.array(v)) for k, v in built["weights"].items())


def test_init_refuses_bad_input_in_one_line(built, tmp_path):
    from showo_mlx.cli import app
    from showo_mlx.train.init import InitSpec, build_init

    runner = CliRunner()
    args = ["--codebook-size", str(CODEBOOK), "--resolution", str(RESOLUTION), "--vq", str(REF / "magvitv2")]
    exists = runner.invoke(app, ["init", str(built["phi"]), str(built["out"]), *args])
    assert exists.exit_code == 2 and "already exists" in exists.output and "--force" in exists.output
    wrong_codebook = runner.invoke(app, ["init", str(built["phi"]), str(tmp_path / "x"), "--codebook-size", "8192", "--resolution",
                                         str(RESOLUTION), "--vq", str(REF / "magvitv2")])
    assert wrong_codebook.exit_code == 2 and "--codebook-size 64" in wrong_codebook.output
    assert "Traceback" not in wrong_codebook.output and not (tmp_path / "x").exists()
    spec = dict(codebook_size=CODEBOOK, resolution=RESOLUTION, vq=str(REF / "magvitv2"))
    old = make_phi(tmp_path / "msft", config={**phi_config(), "model_type": "phi-msft"})
    with pytest.raises(ShowoError, match="phi-msft"):
        build_init(InitSpec(str(old), **spec), tmp_path / "y", log=lambda m: None)
    partial = phi_tensors()
    del partial["model.layers.1.mlp.fc2.bias"]
    with pytest.raises(ShowoError, match="missing.*fc2.bias"):
        build_init(InitSpec(str(make_phi(tmp_path / "partial", partial)), **spec), tmp_path / "z", log=lambda m: None)
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_stage_presets_chain_from_init(tmp_path):
    from showo_mlx.train.config import TrainConfig
    from showo_mlx.train.distributed import World
    from showo_mlx.train.init import starting_model

    stage1 = TrainConfig.from_dict({"preset": "pretraining_stage1"})
    assert stage1.init == "microsoft/phi-1_5" and stage1.output == "runs/pretraining_stage1"
    chain = ["pretraining_stage1", "pretraining_stage2", "pretraining_stage3", "instruction_tuning_1", "instruction_tuning_2"]
    for previous, stage in zip(chain, chain[1:]):
        cfg = TrainConfig.from_dict({"preset": stage})
        assert cfg.init is None and cfg.model == f"runs/{previous}/model" and cfg.output == f"runs/{stage}"
    assert TrainConfig.from_dict({"preset": "pretraining_stage1", "model": "showlab/show-o"}).init is None  # explicit start wins
    with pytest.raises(TrainingConfigError, match="init and model"):
        TrainConfig.from_dict({"init": "microsoft/phi-1_5", "model": "showlab/show-o"})
    with pytest.raises(TrainingConfigError, match="unknown init key 'codebook'"):
        TrainConfig.from_dict({"init": {"from": "microsoft/phi-1_5", "codebook": 64}})
    cfg = TrainConfig.from_dict({"preset": "instruction_tuning_1", "output": str(tmp_path / "run")})
    with pytest.raises(TrainingConfigError, match="result of pretraining_stage3.*train that stage first"):
        starting_model(cfg, World(None), tmp_path / "run", log=lambda m: None)


def test_stage1_from_init_trains_and_its_result_generates(built, tmp_path):
    """`init:` in a training config builds RUN/init (identical to `showo init` with the same seed),
    trains from it, and the result folder loads and generates like any converted model."""
    from showo_mlx.pipeline import Pipeline
    from showo_mlx.train.config import TrainConfig
    from showo_mlx.train.trainer import Trainer

    make_prepared(tmp_path / "prep")
    init = {"from": str(built["phi"]), "codebook_size": CODEBOOK, "resolution": RESOLUTION, "seed": 7, "vq": str(REF / "magvitv2")}
    cfg = TrainConfig.from_dict({"init": init, "data": str(tmp_path / "prep"), "output": str(tmp_path / "run"), "batch_t2i": 1,
                                 "batch_lm": 0, "batch_mmu": 1, "max_steps": 3, "warmup_steps": 1, "lr": 1e-3, "progress": False})
    result = Trainer(cfg, log=lambda m: None).run()
    start = dict(mx.load(str(tmp_path / "run" / "init" / "model.safetensors")))
    assert all(np.array_equal(np.array(start[k]), np.array(v)) for k, v in built["weights"].items())
    assert result.steps == 3 and all(np.isfinite(h.loss) for h in result.history)
    trained = dict(mx.load(str(result.output / "model.safetensors")))
    assert not np.array_equal(np.array(trained["lm_head.weight"]), np.array(start["lm_head.weight"]))  # it learned
    images = Pipeline(result.output).generate("a red cat", seed=0, steps=2)
    assert images[0].image.size == (RESOLUTION, RESOLUTION)
