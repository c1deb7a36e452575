"""config.json values (issue 16 item 9): every bad value is one line naming the field, at conversion
(the official configs) and at load time (our converted config), never a ZeroDivisionError, a
traceback from deep inside model construction or an unbounded allocation."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REF
from showo_mlx.cli import app
from showo_mlx.config import MagvitConfig, ShowoConfig
from showo_mlx.errors import ShowoConfigError
from showo_mlx.loading import read_model_config

SHOWO = json.loads((REF / "showo" / "config.json").read_text())
MAGVIT = json.loads((REF / "magvitv2" / "config.json").read_text())
NAN = float("nan")


def one_line(call) -> str:
    with pytest.raises(ShowoConfigError) as info:
        call()
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


def changed(base: dict, path: str, value) -> dict:
    """A deep copy of `base` with the value at "a.b.c" replaced (or the whole config if path is "")."""
    if not path:
        return value
    out = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    node[last] = value
    return out


# (path in the official Show-o config.json, bad value, words the error must contain)
BAD_SHOWO = [
    ("llm_config.num_hidden_layers", 1_000_000, "num_hidden_layers must be an integer from 1 to 1,000"),
    ("llm_config.num_attention_heads", 0, "num_attention_heads must be an integer from 1"),
    ("llm_config.hidden_size", 0, "hidden_size must be an integer from 1"),
    ("llm_config.hidden_size", 70_000, "hidden_size must be an integer from 1 to 65,536"),
    ("llm_config.layer_norm_eps", -1e-5, "layer_norm_eps must be a number above 0"),
    ("llm_config.rope_theta", NAN, "rope_theta must be a number above 0"),
    ("llm_config.hidden_size", "128", "hidden_size must be an integer"),
    ("llm_config.num_hidden_layers", None, "num_hidden_layers must be an integer"),
    ("llm_config.intermediate_size", 256.0, "intermediate_size must be an integer"),
    ("llm_config.num_hidden_layers", True, "num_hidden_layers must be an integer"),
    ("llm_config", [1, 2], "llm_config): expected a JSON object"),
    ("", ["not", "an", "object"], "expected a JSON object, got list"),
    ("llm_config.num_attention_heads", 3, "hidden_size 128 is not divisible by num_attention_heads 3"),
    ("llm_config.partial_rotary_factor", 2.0, "partial_rotary_factor must be a number above 0 and at most 1"),
    ("llm_config.partial_rotary_factor", 0.05, "RoPE needs an even number of at least 2"),
    ("llm_config.partial_rotary_factor", 0.3, "gives 19 rotary dimensions"),
    ("num_vq_tokens", 60, "num_vq_tokens 60 is not a square number"),
    ("codebook_size", "64", "codebook_size must be an integer"),
    ("vocab_size", None, "vocab_size must be an integer"),
    ("vocab_size", -5, "vocab_size must be an integer from 2"),
    ("mask_token_id", 1.5, "mask_token_id must be an integer"),
    ("w_clip_vit", "false", "w_clip_vit must be true or false"),
    ("llm_config.max_position_embeddings", 64, "below max_position_embeddings 64"),
]


@pytest.mark.parametrize("path,value,needle", BAD_SHOWO, ids=[f"{p or 'config'}={v!r}" for p, v, _ in BAD_SHOWO])
def test_bad_showo_config_values(path, value, needle):
    message = one_line(lambda: ShowoConfig.from_hub_dict(changed(SHOWO, path, value)))
    assert needle in message, message
    assert message.endswith("fix the model's config.json (or convert it again from the official checkpoint)")


BAD_MAGVIT = [
    ("fixture_hparams.encoder.ch_mult", "11112", "ch_mult entry must be an integer"),
    ("fixture_hparams.encoder.ch_mult", [], "encoder.ch_mult must be a list of 1 to 8 integers"),
    ("fixture_hparams.encoder.ch", 0, "ch must be an integer from 1"),
    ("fixture_hparams.decoder.z_channels", 5, "decoder.z_channels 5 must equal codebook_bits 6"),
    ("fixture_hparams.groupnorm.num_groups", 0, "num_groups must be an integer from 1"),
    ("fixture_hparams.groupnorm.num_groups", 5, "not divisible by num_groups 5"),
    ("fixture_hparams.groupnorm.eps", -1.0, "norm_eps must be a number above 0"),
    ("fixture_hparams.quantizer.codebook_dim", 40, "codebook_bits must be an integer from 1 to 20"),
    ("fixture_hparams.encoder", [32], "malformed"),
    ("fixture_hparams.decoder.num_res_blocks", [1, 1], "one entry per ch_mult entry"),
    ("fixture_hparams.encoder.in_ch", 4, "in_channels must be 3"),
    ("fixture_hparams", "yes", "expected a JSON object"),
]


@pytest.mark.parametrize("path,value,needle", BAD_MAGVIT, ids=[f"{p}={v!r}" for p, v, _ in BAD_MAGVIT])
def test_bad_magvit_config_values(path, value, needle):
    message = one_line(lambda: MagvitConfig.from_hub_dict(changed(MAGVIT, path, value)))
    assert needle in message, message


def test_upper_bounds_are_inclusive_and_the_real_configs_pass():
    ok = changed(SHOWO, "llm_config.num_hidden_layers", 1000)
    assert ShowoConfig.from_hub_dict(ok).num_hidden_layers == 1000  # only the config, no model built
    assert ShowoConfig().validate() == ShowoConfig()  # Phi-1.5 / show-o numbers
    assert MagvitConfig.from_hub_dict({"_class_name": "MAGVITv2"}).validate() == MagvitConfig()


def test_bad_config_at_conversion_is_one_line_with_exit_code_2(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REF / "showo", src)
    (src / "config.json").write_text(json.dumps(changed(SHOWO, "llm_config.num_attention_heads", 0)))
    result = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out"), "--vq", str(REF / "magvitv2"),
                                      "--tokenizer", str(REF / "tokenizer")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "num_attention_heads must be an integer from 1" in result.stderr
    assert not (tmp_path / "out").exists()


MAGVIT_32_CODES = MagvitConfig.from_hub_dict(MAGVIT).to_dict()
MAGVIT_32_CODES["codebook_bits"] = MAGVIT_32_CODES["encoder"]["z_channels"] = MAGVIT_32_CODES["decoder"]["z_channels"] = 5

# (path in a converted folder's config.json, bad value, words the error must contain)
BAD_CONVERTED = [
    ("showo.num_hidden_layers", 1_000_000, "num_hidden_layers must be an integer from 1 to 1,000"),
    ("showo.num_attention_heads", 0, "num_attention_heads must be an integer from 1"),
    ("showo", [1], "(showo): expected a JSON object"),
    ("magvit.num_groups", 0, "num_groups must be an integer from 1"),
    ("magvit.encoder", "x", "malformed"),
    ("magvit.codebook_bits", 5, "z_channels 6 must equal codebook_bits 5"),
    ("magvit", MAGVIT_32_CODES, "the transformer has 64 image codes but MAGVIT-v2 has 32"),
    ("dtype", "float64", "dtype must be one of ['float32', 'float16', 'bfloat16']"),
    ("magvit_dtype", 16, "magvit_dtype must be one of"),
    ("quantization", {"bits": "4", "group_size": 64}, "quantization bits must be one of"),
    ("quantization", {"bits": 4, "group_size": 48}, "quantization group_size must be one of [32, 64, 128]"),
    ("quantization", {"bits": 4, "group_size": 64, "lm_head": {"bits": 9, "group_size": 64}}, "quantization of lm_head bits"),
    ("quantization", [4, 64], "(quantization): expected a JSON object"),
    ("files.transformer", "model.safetensors", "files.transformer must be a list"),
    ("files.transformer", ["../../../etc/passwd.safetensors"], "plain .safetensors file name"),
    ("files.magvit", "magvit.npz", "files.magvit must be a plain .safetensors file name"),
    ("format_version", "1", "format_version must be a non-negative integer"),
]


@pytest.mark.parametrize("path,value,needle", BAD_CONVERTED, ids=[f"{p}={v!r}" for p, v, _ in BAD_CONVERTED])
def test_bad_converted_config_values_are_refused_at_load_time(tmp_path, converted, path, value, needle):
    config = json.loads((converted / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(changed(config, path, value)))
    message = one_line(lambda: read_model_config(tmp_path))
    assert needle in message and str(tmp_path / "config.json") in message, message


def test_converted_config_passes_its_own_validation(converted):
    config = read_model_config(converted)  # what `showo convert` writes is what loading accepts
    assert config["showo"]["num_hidden_layers"] == 2 and config["magvit"]["codebook_bits"] == 6
