"""`showo init`: the official stage-1 starting model, built from microsoft/phi-1_5.

The reference starts pre-training stage 1 from Phi-1.5 (`models/modeling_showo.py`,
`Showo.__init__` with `load_from_showo=False`):

1. `PhiForCausalLM.from_pretrained("microsoft/phi-1_5")` with Show-o's patched `models/phi.py`,
   which switches on the per-head QK-LayerNorms (`config.qk_layernorm = True`). Phi's checkpoint has
   no such tensors, so they keep torch's LayerNorm defaults: weight 1, bias 0. Every other tensor
   is Phi's own, loaded as float32 (phi-1_5 stores float16; the upcast is exact).
2. `resize_token_embeddings(vocab_size)` (transformers 4.41, `PreTrainedModel._get_resized_embeddings`
   and `_get_resized_lm_head`): a new embedding and a new lm_head (with bias) of
   `vocab_size = llm_vocab_size + 10 + codebook_size + 1` rows (58,498 for the real model),
   initialised by `PhiPreTrainedModel._init_weights` — weights normal(0, initializer_range), bias 0
   — then the first min(old, new) rows copied from Phi (phi-1_5's 51,200 rows: its 50,295 tokens plus
   padding rows, which are copied too).

The result is written as a converted showo-mlx folder (transformer, MAGVIT-v2, tokenizer), atomically,
so every command loads it and `showo train` trains it. The new rows come from NumPy's PCG64, one
stream for the embedding and one for the head, both derived from `seed`: the same seed gives the
same folder on every machine (torch's generator stream itself cannot be reproduced outside torch,
only its distribution).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..errors import CheckpointError, ShowoConfigError, ShowoError, TrainingConfigError

DEFAULT_SOURCE = "microsoft/phi-1_5"
DEFAULT_SEED = 10086  # the reference's training seed (configs/showo_pretraining_stage1.yaml)
NEW_SPECIAL_TOKENS = 10  # [PAD] + the 9 task tokens (training/prompting_utils.py, UniversalPrompting)
_LLM_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "partial_rotary_factor", "rope_theta", "layer_norm_eps", "max_position_embeddings", "hidden_act")


@dataclass
class InitSpec:
    """What `showo init` builds: Phi weights from `source`, Show-o's vocabulary for `codebook_size`
    image codes, `resolution` px images (through the MAGVIT-v2 at `vq`), new rows drawn with `seed`."""

    source: str = DEFAULT_SOURCE
    codebook_size: int = 8192
    resolution: int = 256
    seed: int = DEFAULT_SEED
    vq: Optional[str] = None  # default showlab/magvitv2
    tokenizer: Optional[str] = None  # default: the source's own tokenizer files

    @classmethod
    def from_value(cls, value: Any) -> "InitSpec":
        """`init: microsoft/phi-1_5` or `init: {from: ..., codebook_size: ..., resolution: ..., seed: ...}`."""
        if isinstance(value, str):
            return cls(source=value)
        if not isinstance(value, dict):
            raise TrainingConfigError(f"init must be a model id/folder or a mapping, got {value!r}")
        known = {"from", "codebook_size", "resolution", "seed", "vq", "tokenizer"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TrainingConfigError(f"unknown init key {unknown[0]!r}; valid keys: {sorted(known)}")
        spec = cls(source=str(value.get("from", DEFAULT_SOURCE)))
        for key in ("codebook_size", "resolution", "seed"):
            if key in value:
                if not isinstance(value[key], int) or isinstance(value[key], bool):
                    raise TrainingConfigError(f"init.{key} must be an integer, got {value[key]!r}")
                setattr(spec, key, value[key])
        spec.vq = None if value.get("vq") is None else str(value["vq"])
        spec.tokenizer = None if value.get("tokenizer") is None else str(value["tokenizer"])
        return spec.validate()

    def validate(self) -> "InitSpec":
        if self.codebook_size < 2:
            raise ShowoError(f"codebook size must be at least 2, got {self.codebook_size}")
        if self.resolution < 1:
            raise ShowoError(f"resolution must be positive, got {self.resolution}")
        return self


# -- Phi's checkpoint ------------------------------------------------------------------------------
def read_phi_config(folder: Path) -> dict[str, Any]:
    """phi-1_5's transformers `config.json` (model_type "phi"), checked for what Show-o supports."""
    from ..config import read_json

    cfg = read_json(folder / "config.json")
    kind = cfg.get("model_type")
    if kind != "phi":
        old = " (the pre-2024 phi-msft/MixFormer layout)" if kind in ("phi-msft", "mixformer-sequential") else ""
        raise ShowoConfigError(
            f"{folder}/config.json describes model_type {kind!r}{old}, not transformers' 'phi'; "
            "use the current revision of microsoft/phi-1_5 (PhiForCausalLM, model.safetensors)"
        )
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size") if k not in cfg]
    if missing:
        raise ShowoConfigError(f"{folder}/config.json lacks {missing}; is this a Phi checkpoint?")
    kv = cfg.get("num_key_value_heads")
    if kv not in (None, cfg["num_attention_heads"]):
        raise ShowoConfigError(f"{folder}: grouped-query attention ({kv} key/value heads) is not Show-o's Phi-1.5")
    if cfg.get("tie_word_embeddings"):
        raise ShowoConfigError(f"{folder}: tied embeddings; Show-o's Phi-1.5 has a separate lm_head")
    return cfg


def phi_key(name: str) -> str:
    """HF `PhiForCausalLM` key → ours: `model.X` → `X`; `lm_head.*` stays."""
    if name.startswith("lm_head."):
        return name
    if name.startswith("model."):
        return name[len("model."):]
    raise CheckpointError(f"unexpected tensor {name!r} in the Phi checkpoint; is this microsoft/phi-1_5 (PhiForCausalLM)?")


def expected_phi_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of transformers' PhiForCausalLM without QK-LayerNorm, by its HF name."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, d), "model.final_layernorm.weight": (d,), "model.final_layernorm.bias": (d,),
        "lm_head.weight": (v, d), "lm_head.bias": (v,),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "dense"):
            shapes[f"{p}self_attn.{proj}.weight"], shapes[f"{p}self_attn.{proj}.bias"] = (d, d), (d,)
        shapes[f"{p}mlp.fc1.weight"], shapes[f"{p}mlp.fc1.bias"] = (f, d), (f,)
        shapes[f"{p}mlp.fc2.weight"], shapes[f"{p}mlp.fc2.bias"] = (d, f), (d,)
        shapes[f"{p}input_layernorm.weight"], shapes[f"{p}input_layernorm.bias"] = (d,), (d,)
    return shapes


def check_phi_checkpoint(folder: Path, cfg: dict[str, Any]) -> None:
    """Names and shapes from the headers only, before gigabytes are read."""
    from ..checkpoint_io import describe_checkpoint

    found = {name: info.shape for name, info in describe_checkpoint(folder).items() if not _is_buffer(name)}
    expected = expected_phi_shapes(cfg)
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise CheckpointError(f"{folder}: {what}; the checkpoint is not a PhiForCausalLM matching its config.json")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise CheckpointError(f"{folder}: {name} has shape {tuple(found[name])}, config.json implies {shape}")


def _is_buffer(name: str) -> bool:
    """RoPE tables some older exports saved; recomputed by the model, never weights."""
    return name.endswith("rotary_emb.inv_freq")


# -- resize_token_embeddings -------------------------------------------------------------------------
def resized_rows(old: np.ndarray, rows: int, std: float, rng: np.random.Generator | None, *, zero: bool = False) -> np.ndarray:
    """transformers 4.41's resize of an embedding/lm_head matrix (or of the head's bias with
    `zero=True`): rows beyond the old ones drawn from normal(0, std) (bias: 0), the first
    min(old, rows) rows copied. Only the new rows are drawn (the reference draws all and overwrites
    the copied ones; the new rows have the same distribution)."""
    keep = min(old.shape[0], rows)
    out = np.empty((rows,) + old.shape[1:], dtype=np.float32)
    out[:keep] = old[:keep]
    if rows > keep:
        shape = (rows - keep,) + old.shape[1:]
        out[keep:] = 0.0 if zero else rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return out


# -- the build ---------------------------------------------------------------------------------------
def showo_config_for(phi: dict[str, Any], llm_vocab_size: int, codebook_size: int, num_vq_tokens: int):
    from ..config import PHI_1_5, ShowoConfig

    llm = {k: phi.get(k, PHI_1_5[k]) for k in _LLM_FIELDS}
    vocab = llm_vocab_size + NEW_SPECIAL_TOKENS + codebook_size + 1
    return ShowoConfig(**llm, vocab_size=vocab, llm_vocab_size=llm_vocab_size, codebook_size=codebook_size,
                       num_vq_tokens=num_vq_tokens, mask_token_id=vocab - 1,
                       num_new_special_tokens=NEW_SPECIAL_TOKENS).validate()


def build_init(spec: InitSpec, out: str | Path, *, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Build the stage-1 starting model from Phi (a Hub id or folder) into the converted folder `out`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .. import __version__
    from ..config import MagvitConfig, read_json
    from ..convert import DEFAULT_VQ, FORMAT_VERSION, check_complete, copy_tokenizer, load_magvit_source, save_sharded
    from ..fsutil import atomic_output_dir
    from ..hub import resolve_source
    from ..magvit import MagvitV2
    from ..model import ShowoTransformer
    from ..prompting import _load_hf_tokenizer

    spec.validate()
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise ShowoError(f"{out} already exists; choose another destination or pass --force to replace it")
    src = resolve_source(spec.source, kind="phi")
    vq_dir = resolve_source(spec.vq or DEFAULT_VQ, kind="vq")
    tok_dir = resolve_source(spec.tokenizer, kind="tokenizer") if spec.tokenizer else src
    if not ((tok_dir / "tokenizer.json").exists() or (tok_dir / "vocab.json").exists()):
        raise ShowoError(f"no tokenizer files in {tok_dir}; pass --tokenizer with phi-1_5's tokenizer folder")

    # Everything is checked before the first tensor is read.
    phi = read_phi_config(src)
    check_phi_checkpoint(src, phi)
    vq_cfg = MagvitConfig.from_hub_dict(read_json(vq_dir / "config.json"))
    if spec.codebook_size != vq_cfg.codebook_size:
        raise ShowoError(f"--codebook-size {spec.codebook_size} does not match the MAGVIT-v2 at {vq_dir} "
                         f"({vq_cfg.codebook_size} codes); pass --codebook-size {vq_cfg.codebook_size}")
    factor = vq_cfg.downsample_factor
    if spec.resolution % factor:
        raise ShowoError(f"--resolution {spec.resolution} is not a multiple of MAGVIT's downsampling factor {factor}")
    llm_vocab = len(_load_hf_tokenizer(tok_dir))
    cfg = showo_config_for(phi, llm_vocab, spec.codebook_size, (spec.resolution // factor) ** 2)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ShowoConfigError(f"{src}: hidden size {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads")
    std = float(phi.get("initializer_range", 0.02))
    old_rows = int(phi["vocab_size"])
    log(f"building the stage-1 model from {spec.source}: vocabulary {old_rows} → {cfg.vocab_size} rows "
        f"({max(0, cfg.vocab_size - old_rows)} new, normal(0, {std}) with seed {spec.seed})")

    # One independent stream per resized matrix, so the draws do not depend on the order of the
    # tensors in Phi's file.
    embed_rng, head_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(2))
    streams = {"model.embed_tokens.weight": embed_rng, "lm_head.weight": head_rng, "lm_head.bias": None}
    weights: dict[str, mx.array] = {}
    for name, array in _phi_tensors(src):
        key = phi_key(name)
        if name in streams:
            array = resized_rows(array, cfg.vocab_size, std, streams[name], zero=name == "lm_head.bias")
        weights[key] = mx.array(np.ascontiguousarray(array, dtype=np.float32))
    head = cfg.head_dim
    for i in range(cfg.num_hidden_layers):  # Show-o's per-head QK-LayerNorms: torch's defaults
        for norm in ("q_layernorm", "k_layernorm"):
            weights[f"layers.{i}.self_attn.{norm}.weight"] = mx.ones((head,), dtype=mx.float32)
            weights[f"layers.{i}.self_attn.{norm}.bias"] = mx.zeros((head,), dtype=mx.float32)
    model = ShowoTransformer(cfg)  # parameters are lazy: only their shapes are used here
    check_complete(model, weights, str(src))
    ordered = {k: weights[k] for k, _ in tree_flatten(model.parameters())}
    del weights

    vq_cfg, vq_weights = load_magvit_source(vq_dir)
    check_complete(MagvitV2(vq_cfg), vq_weights, str(vq_dir))
    record = {**asdict(spec), "initializer_range": std, "phi_vocab_size": old_rows}
    config: dict[str, Any] = {
        "model_type": "showo",
        "format_version": FORMAT_VERSION,
        "showo_mlx_version": __version__,
        "dtype": "float32",
        "showo": cfg.to_dict(),
        "magvit": vq_cfg.to_dict(),
        "magvit_dtype": "float32",
        "source": {"model": str(spec.source), "vq": str(spec.vq or DEFAULT_VQ)},
        "init": record,
    }
    with atomic_output_dir(out, force=force) as tmp:
        files = save_sharded(tmp, ordered)
        mx.save_safetensors(str(tmp / "magvit.safetensors"), {k: v.astype(mx.float32) for k, v in vq_weights.items()},
                            metadata={"format": "mlx"})
        copy_tokenizer(tok_dir, tmp)
        config["files"] = {"transformer": files, "magvit": "magvit.safetensors"}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    log(f"wrote {out}")
    return out


def _phi_tensors(src: Path):
    from ..checkpoint_io import iter_checkpoint

    return iter_checkpoint(src, select=lambda name: not _is_buffer(name))


# -- training: `init:` in the config -----------------------------------------------------------------
def init_folder(run_dir: Path) -> Path:
    """Where `showo train` builds a run's starting model when the config has `init:`."""
    return Path(run_dir) / "init"


def ensure_init(spec: InitSpec, run_dir: Path, world, log: Callable[[str], None]) -> Path:
    """The run's starting model, built once into RUN/init (reused on --resume).

    Rank 0 builds it while the others wait; a rank on another machine that still does not see it
    then builds its own copy, which is identical (the build is a pure function of its inputs)."""
    from ..convert import is_converted

    folder = init_folder(run_dir)
    if world.is_main and not is_converted(folder):
        build_init(spec, folder, force=folder.exists(), log=log)
    world.barrier()
    if not is_converted(folder):
        build_init(spec, folder, force=folder.exists(), log=lambda m: None)
    built = json.loads((folder / "config.json").read_text()).get("init", {})
    wanted = asdict(spec)
    if {k: built.get(k) for k in wanted} != wanted:
        raise TrainingConfigError(
            f"{folder} was built with other init settings ({ {k: built.get(k) for k in wanted} }); "
            "delete it or choose another output"
        )
    return folder


def starting_model(cfg, world, run_dir: Path, log: Callable[[str], None]) -> Path:
    """The converted folder a training run starts from: built from `init:` (stage 1), or `model:`.

    A stage preset names the previous stage's result (e.g. runs/pretraining_stage1/model); when that
    folder does not exist yet the error says which stage to run first."""
    from ..loading import resolve_model
    from .presets import chained_model_hint

    if cfg.init is not None:
        return ensure_init(InitSpec.from_value(cfg.init), run_dir, world, log)
    hint = chained_model_hint(cfg.preset, cfg.model)
    if hint is not None and not Path(cfg.model).exists():
        raise TrainingConfigError(hint)
    return resolve_model(cfg.model, log=log)


# -- the command ---------------------------------------------------------------------------------------
def register(app) -> None:
    """`showo init SOURCE OUT [--codebook-size] [--resolution] [--seed] [--vq] [--tokenizer] [--force]`."""
    import typer

    from ..cli_common import closing_line, handle_errors

    def init(
        source: str = typer.Argument(..., help="Phi-1.5 checkpoint: Hub id (microsoft/phi-1_5) or a folder with config.json + model.safetensors."),
        out: Path = typer.Argument(..., help="Output folder (a converted showo-mlx model)."),
        codebook_size: int = typer.Option(8192, "--codebook-size", help="Image codes: the size of the MAGVIT-v2 codebook (default 8192)."),
        resolution: int = typer.Option(256, "--resolution", help="Image size in pixels; 256 → 16×16 = 256 image tokens (default 256)."),
        seed: int = typer.Option(DEFAULT_SEED, "--seed", help="Seed of the new embedding/head rows (default 10086, the reference's training seed)."),
        vq: Optional[str] = typer.Option(None, "--vq", help="MAGVIT-v2 folder or Hub id (default showlab/magvitv2)."),
        tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: SOURCE's)."),
        force: bool = typer.Option(False, "--force", help="Replace OUT only if it is empty or a previous showo-mlx model folder; off by default."),
    ) -> None:
        """Build Show-o's stage-1 starting model from Phi-1.5 (resized vocabulary, fresh QK-LayerNorms)."""
        start = time.perf_counter()
        spec = InitSpec(source, codebook_size, resolution, seed, vq, tokenizer)
        build_init(spec, out, force=force, log=lambda m: typer.echo(m, err=True))
        closing_line(start)

    app.command("init", epilog=(
        "Examples:\n\n"
        "  showo init microsoft/phi-1_5 models/stage1-init\n\n"
        "  showo init ./phi-1_5 models/stage1-512 --resolution 512 --seed 1\n"
    ))(handle_errors(init))
