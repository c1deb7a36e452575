"""Model configurations: the unified transformer (`ShowoConfig`) and MAGVIT-v2 (`MagvitConfig`).

Both read the official Hub ``config.json`` files (diffusers ``ConfigMixin`` layout, read by the official
``models/modeling_utils.py``) and our
own converted ``config.json``. The Hub Show-o config does not carry the Phi-1.5 numbers (the reference
fetches them from ``microsoft/phi-1_5`` at run time in ``models/modeling_showo.py``, ``Showo.__init__``),
so they are embedded here as defaults;
a config with an ``llm_config`` block (the test fixtures) overrides them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config_schema import SHOWO_FIELDS, check_magvit_fields, check_number, check_showo_fields, fail, require_object
from .errors import ShowoConfigError, ShowoError

# microsoft/phi-1_5's config.json numbers (what `Showo.__init__` reads); used when the Hub config only names the LLM.
PHI_1_5 = dict(
    hidden_size=2048,
    num_hidden_layers=24,
    num_attention_heads=32,
    intermediate_size=8192,
    partial_rotary_factor=0.5,
    rope_theta=10000.0,
    layer_norm_eps=1e-5,
    max_position_embeddings=2048,
    hidden_act="gelu_new",
)


@dataclass
class ShowoConfig:
    """Numbers of the unified transformer and of its vocabulary layout (Phi-1.5 resized to 58498 rows
    by `Showo.__init__`; the added tokens of `training/prompting_utils.py`, `UniversalPrompting.__init__`)."""

    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    intermediate_size: int = 8192
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    hidden_act: str = "gelu_new"
    vocab_size: int = 58498
    llm_vocab_size: int = 50295
    codebook_size: int = 8192
    num_vq_tokens: int = 256
    mask_token_id: int = 58497
    num_new_special_tokens: int = 10
    # The demo text block is max_seq_length + 1 tokens: 128 as in the official `configs/showo_demo.yaml`
    # the inference scripts use, not the instruction-tuning configs' values.
    max_seq_length: int = 128
    w_clip_vit: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def image_token_offset(self) -> int:
        return self.llm_vocab_size + self.num_new_special_tokens

    @property
    def image_grid(self) -> tuple[int, int]:
        side = int(round(self.num_vq_tokens**0.5))
        return side, side

    def validate(self) -> "ShowoConfig":
        check_showo_fields(self)  # types and ranges first: the arithmetic below relies on them
        if self.hidden_size % self.num_attention_heads:
            raise ShowoConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; fix the model's config.json"
            )
        if self.hidden_act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ShowoConfigError(f"unsupported hidden_act {self.hidden_act!r}; Show-o uses gelu_new")
        expected_vocab = self.image_token_offset + self.codebook_size + 1
        if self.vocab_size != expected_vocab:
            raise ShowoConfigError(
                f"vocab_size {self.vocab_size} != llm_vocab_size + {self.num_new_special_tokens} + "
                f"codebook_size + 1 = {expected_vocab}; the config does not describe a Show-o model"
            )
        if self.mask_token_id != self.vocab_size - 1:
            raise ShowoConfigError(
                f"mask_token_id {self.mask_token_id} must be vocab_size - 1 = {self.vocab_size - 1}"
            )
        return self

    @classmethod
    def from_hub_dict(cls, d: dict[str, Any]) -> "ShowoConfig":
        """Build from the official diffusers-style config (plus an optional ``llm_config`` block)."""
        require_object(d, "config.json")
        if d.get("_class_name") not in (None, "Showo"):
            raise ShowoConfigError(
                f"config.json describes a {d.get('_class_name')!r}, not a Show-o model; "
                "point SRC at a Show-o checkpoint folder"
            )
        llm = dict(PHI_1_5)
        if "llm_config" in d:
            src = require_object(d["llm_config"], "config.json (llm_config)")
            llm.update({k: src[k] for k in PHI_1_5 if k in src})
        elif "phi-1_5" not in str(d.get("llm_model_path", "microsoft/phi-1_5")):
            raise ShowoConfigError(
                f"unknown llm_model_path {d.get('llm_model_path')!r} and no llm_config block; "
                "only microsoft/phi-1_5 based checkpoints are supported"
            )
        if type(d.get("w_clip_vit", False)) is not bool:
            raise fail("config.json", f"w_clip_vit must be true or false, got {d['w_clip_vit']!r:.40}")
        check_number(d.get("vocab_size", 58498), "vocab_size", *SHOWO_FIELDS["vocab_size"], "config.json")
        fields = dict(
            vocab_size=d.get("vocab_size", 58498),
            llm_vocab_size=d.get("llm_vocab_size", 50295),
            codebook_size=d.get("codebook_size", 8192),
            num_vq_tokens=d.get("num_vq_tokens", 256),
            w_clip_vit=bool(d.get("w_clip_vit", False)),
        )
        fields["mask_token_id"] = d.get("mask_token_id", fields["vocab_size"] - 1)
        return cls(**llm, **fields).validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShowoConfig":
        """Build from our own serialised form (``asdict``); unknown keys are refused by name."""
        require_object(d, "showo config")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ShowoConfigError(f"unknown key(s) {unknown} in the showo config; remove them")
        return cls(**d).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class MagvitCoderConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    num_res_blocks: tuple[int, ...] = (4, 3, 4, 3, 4)
    z_channels: int = 13
    in_channels: int = 3
    out_channels: int = 3


@dataclass
class MagvitConfig:
    """MAGVIT-v2 hyper-parameters; defaults are the released showlab/magvitv2 (hard-coded in the
    official `models/modeling_magvitv2.py`, `VQGANEncoder` / `VQGANDecoder` / `LFQuantizer`)."""

    encoder: MagvitCoderConfig = field(default_factory=MagvitCoderConfig)
    decoder: MagvitCoderConfig = field(
        default_factory=lambda: MagvitCoderConfig(ch_mult=(1, 1, 2, 2, 4), num_res_blocks=(4, 4, 3, 4, 3))
    )
    codebook_bits: int = 13
    num_groups: int = 32
    norm_eps: float = 1e-6

    @property
    def codebook_size(self) -> int:
        return 2**self.codebook_bits

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.encoder.ch_mult) - 1)

    @classmethod
    def from_hub_dict(cls, d: dict[str, Any]) -> "MagvitConfig":
        """The Hub config holds only the class name (all numbers are the defaults); the fixtures add
        a ``fixture_hparams`` block with every constructor argument."""
        require_object(d, "config.json")
        if d.get("_class_name") not in (None, "MAGVITv2"):
            raise ShowoConfigError(
                f"config.json describes a {d.get('_class_name')!r}, not MAGVITv2; pass the image "
                "tokenizer folder (showlab/magvitv2)"
            )
        hp = d.get("fixture_hparams")
        if not hp:
            return cls()
        try:
            return cls._from_hparams(require_object(hp, "config.json (fixture_hparams)")).validate()
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise fail("config.json (fixture_hparams)", f"malformed ({type(e).__name__}: {e!s:.80})") from None

    @classmethod
    def _from_hparams(cls, hp: dict[str, Any]) -> "MagvitConfig":
        def coder(c: dict[str, Any]) -> MagvitCoderConfig:
            return MagvitCoderConfig(
                ch=c["ch"],
                ch_mult=tuple(c["ch_mult"]),
                num_res_blocks=tuple(c["num_res_blocks"]),
                z_channels=c["z_channels"],
                in_channels=c.get("in_ch", 3),
                out_channels=c.get("out_ch", 3),
            )

        gn = hp.get("groupnorm", {})
        return cls(
            encoder=coder(hp["encoder"]),
            decoder=coder(hp["decoder"]),
            codebook_bits=hp["quantizer"]["codebook_dim"],
            num_groups=gn.get("num_groups", 32),
            norm_eps=gn.get("eps", 1e-6),
        )

    def validate(self) -> "MagvitConfig":
        check_magvit_fields(self)
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MagvitConfig":
        try:
            return cls._from_plain_dict(dict(require_object(d, "magvit config"))).validate()
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise fail("magvit config", f"malformed ({type(e).__name__}: {e!s:.80})") from None

    @classmethod
    def _from_plain_dict(cls, d: dict[str, Any]) -> "MagvitConfig":
        enc = MagvitCoderConfig(**{**d.pop("encoder"), })
        dec = MagvitCoderConfig(**d.pop("decoder"))
        enc.ch_mult, enc.num_res_blocks = tuple(enc.ch_mult), tuple(enc.num_res_blocks)
        dec.ch_mult, dec.num_res_blocks = tuple(dec.ch_mult), tuple(dec.num_res_blocks)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ShowoConfigError(f"unknown key(s) {unknown} in the magvit config; remove them")
        return cls(encoder=enc, decoder=dec, **d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MAX_CONFIG_BYTES = 16 << 20  # real config.json files are a few kB


def read_json(path: Path) -> dict[str, Any]:
    """Parse a config JSON file: a regular file (never a FIFO or device) of bounded size."""
    from .fsutil import read_regular_file

    try:
        data = read_regular_file(path, limit=MAX_CONFIG_BYTES, error=ShowoConfigError)
        return json.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise ShowoConfigError(f"{path} not found; is this a model folder?") from None
    except OSError as e:
        raise ShowoConfigError(f"{path} cannot be read ({e.strerror or type(e).__name__}); check its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShowoConfigError(f"{path} is not valid JSON ({e}); re-download or re-convert it") from None
    except RecursionError:
        raise ShowoConfigError(f"{path} is nested too deeply to be a config; re-download or re-convert it") from None
