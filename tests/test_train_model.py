"""Model-side training pieces: gradient checkpointing, LoRA, freezing, config handling."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from showo_mlx.config import ShowoConfig
from showo_mlx.errors import TrainingConfigError
from showo_mlx.model import ShowoTransformer
from showo_mlx.train.trainer import apply_freeze, forward_hidden


def _loss_fn(model, ids, checkpoint):
    def loss(params):
        model.update(params)
        h = forward_hidden(model, ids, "causal", checkpoint)
        return nn.losses.cross_entropy(model.lm_head(h), ids).mean()

    return loss


def test_gradient_checkpointing_same_gradients_less_memory():
    cfg = ShowoConfig(hidden_size=128, num_hidden_layers=8, num_attention_heads=2, intermediate_size=512,
                      vocab_size=574, llm_vocab_size=499, codebook_size=64, num_vq_tokens=64, mask_token_id=573)
    mx.random.seed(0)
    model = ShowoTransformer(cfg)
    mx.eval(model.parameters())
    params = model.trainable_parameters()
    ids = mx.random.randint(0, 574, (4, 195))
    results = {}
    for ck in (False, True):
        mx.eval(params)
        mx.clear_cache()
        mx.reset_peak_memory()
        loss, grads = mx.value_and_grad(_loss_fn(model, ids, ck))(params)
        mx.eval(loss, grads)
        results[ck] = (float(loss), dict(tree_flatten(grads)), mx.get_peak_memory())
    (l0, g0, m0), (l1, g1, m1) = results[False], results[True]
    assert l0 == pytest.approx(l1, abs=1e-6)
    for k in g0:
        assert float(mx.abs(g1[k]).max()) > 0, f"{k} got no gradient under checkpointing"
        np.testing.assert_allclose(np.array(g1[k]), np.array(g0[k]), atol=1e-5, rtol=1e-4)
    assert m1 < 0.6 * m0, (m0, m1)  # measured ≈ 0.36× at this size (8 blocks)


def test_lora_starts_equal_trains_only_adapters_and_fuses(converted):
    from showo_mlx.loading import load_transformer
    from showo_mlx.train.lora import adapter_weights, apply_lora, freeze_for_lora, fuse_layers

    base = load_transformer(converted)
    model = load_transformer(converted)
    ids = mx.array(np.random.default_rng(0).integers(0, 574, (2, 40)))
    ref = base(ids, mask="causal")
    n = apply_lora(model, rank=4, scale=2.0, dropout=0.0, keys=["self_attn.*", "mlp.fc1", "lm_head"])
    assert n == 2 * 5 + 1  # q, k, v, dense, fc1 per block + the head (LayerNorms are not Linear)
    freeze_for_lora(model)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable and all(k.endswith(("lora_a", "lora_b")) for k in trainable)
    np.testing.assert_allclose(np.array(model(ids, mask="causal")), np.array(ref), atol=1e-6)  # B = 0
    # give the adapters an effect, then fuse: same logits, plain Linear layers again
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.05) for k, v in adapter_weights(model).items()]))
    with_lora = np.array(model(ids, mask="causal"))
    assert np.abs(with_lora - np.array(ref)).max() > 1e-3
    fuse_layers(model)
    assert not adapter_weights(model)
    np.testing.assert_allclose(np.array(model(ids, mask="causal")), with_lora, atol=1e-4)


def test_lora_keys_that_match_nothing_are_refused(converted):
    from showo_mlx.loading import load_transformer
    from showo_mlx.train.lora import apply_lora

    with pytest.raises(TrainingConfigError, match="match no Linear"):
        apply_lora(load_transformer(converted), rank=4, scale=1.0, dropout=0.0, keys=["nope"])


def test_freeze_by_name_pattern(converted):
    from showo_mlx.loading import load_transformer

    model = load_transformer(converted)
    apply_freeze(model, ["embed_tokens.*", "layers.0.*"], [])
    names = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert not any(k.startswith(("embed_tokens", "layers.0.")) for k in names)
    assert "layers.1.mlp.fc1.weight" in names and "lm_head.weight" in names
    model = load_transformer(converted)
    apply_freeze(model, [], ["lm_head.*"])
    assert {k for k, _ in tree_flatten(model.trainable_parameters())} == {"lm_head.weight", "lm_head.bias"}


# -- config --------------------------------------------------------------------------------------
def test_config_unknown_key_is_refused_by_name(tmp_path):
    from showo_mlx.train.config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-4\nbatch_t2l: 3\n")
    with pytest.raises(TrainingConfigError, match="'batch_t2l'"):
        TrainConfig.load(path)
    with pytest.raises(TrainingConfigError, match="'bogus'"):
        TrainConfig.load(None, sets=["bogus=1"])


def test_config_preset_yaml_and_set_precedence(tmp_path):
    from showo_mlx.train.config import TrainConfig
    from showo_mlx.train.presets import PRESETS

    path = tmp_path / "c.yaml"
    path.write_text("preset: pretraining_stage3\nlr: 1e-4\nmax_grad_norm: 1.0\n")
    cfg = TrainConfig.load(path, {"model": "m", "fine_tune": None}, ["max_steps=7", "warmup_steps=2", "freeze=[embed_tokens.*]", "lr=3e-5"])
    assert (cfg.batch_t2i, cfg.batch_lm, cfg.batch_mmu) == (10, 4, 10)  # from the preset
    assert cfg.max_seq_length == 128 and cfg.dtype == "bfloat16" and cfg.grad_checkpoint
    assert cfg.lr == 3e-5 and cfg.max_steps == 7 and cfg.warmup_steps == 2  # --set beats the YAML
    assert TrainConfig.load(path).lr == 1e-4 and TrainConfig.load(path).warmup_steps == 5000  # YAML beats preset
    assert cfg.model == "m" and cfg.freeze == ["embed_tokens.*"] and cfg.max_grad_norm == 1.0
    for name, values in PRESETS.items():
        assert set(values) <= set(TrainConfig.keys()), name
    it1 = TrainConfig.from_dict({"preset": "instruction_tuning_1"})
    assert (it1.max_seq_length, it1.batch_t2i, it1.batch_lm, it1.batch_mmu, it1.lr) == (381, 4, 2, 7, 2e-5)
    with pytest.raises(TrainingConfigError, match="unknown preset"):
        TrainConfig.from_dict({"preset": "stage9"})
    with pytest.raises(TrainingConfigError, match="QLoRA"):
        TrainConfig.from_dict({"quantize_bits": 4})
