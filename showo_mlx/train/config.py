"""TrainConfig: every training setting, read from YAML with presets and ``--set key=value``.

Precedence, lowest first: dataclass defaults < ``preset:`` < the YAML's own keys < command-line
flags (--model/--data/--lora) < ``--set``. An unknown key anywhere is refused by name, so a typo
never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import TrainingConfigError
from .presets import preset as preset_values

DEFAULT_LORA_KEYS = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2",
]


@dataclass
class TrainConfig:
    preset: str | None = None
    # -- what to train on
    model: str = "showlab/show-o"
    data: str | None = None  # prepared image-caption data → t2i rows (and mmu rows if mmu_data unset)
    mmu_data: str | None = None  # prepared captions or LLaVA conversations → mmu rows
    lm_data: str | None = None  # .txt / .jsonl documents → lm rows
    output: str = "runs/showo"
    # -- sequence and batch (batch sizes are per process and per micro-step)
    max_seq_length: int = 128
    batch_t2i: int = 2
    batch_lm: int = 1
    batch_mmu: int = 2
    grad_accum: int = 1
    # -- objective (spec §8.1, §8.2)
    t2i_coeff: float = 1.0
    lm_coeff: float = 0.1
    mmu_coeff: float = 1.0
    cond_dropout_prob: float = 0.1
    min_masking_rate: float = 0.0
    mmu_questions: list[str] = field(default_factory=list)
    lm_max_chars: int = 8000
    # -- optimizer and schedule
    max_steps: int = 1000
    lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float | None = None
    seed: int = 10086
    # -- precision and memory
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (master weights stay float32)
    grad_checkpoint: bool = False
    # -- what is trained
    fine_tune: str = "full"  # full or lora
    lora_rank: int = 8
    lora_scale: float = 20.0
    lora_dropout: float = 0.0
    lora_keys: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_KEYS))
    lora_layers: int = -1  # the last n blocks get adapters; -1 = all
    quantize_bits: int | None = None  # quantize the frozen base at load (QLoRA)
    quantize_group_size: int = 64
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns kept frozen
    train_only: list[str] = field(default_factory=list)  # if set, only matching parameters train
    # -- bookkeeping
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    val_every: int = 0
    val_prompts: list[str] = field(default_factory=list)
    val_steps: int = 12
    val_guidance: float = 1.5
    val_seed: int = 0
    progress: bool = True

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise TrainingConfigError(f"unknown training config key {unknown[0]!r} in {source}; valid keys: see docs/TRAINING.md")
        merged: dict[str, Any] = {}
        if values.get("preset"):
            merged.update(preset_values(values["preset"]))
        merged.update(values)
        notes = _fit_default_warmup(merged, values, {f.name: f.default for f in dataclasses.fields(cls)})
        cfg = cls(**merged).validate()
        cfg.notes = notes  # what was adjusted, for the command to print
        return cfg

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None, sets: list[str] | None = None) -> "TrainConfig":
        values: dict[str, Any] = {}
        if path is not None:
            values = read_yaml(Path(path))
        for k, v in (overrides or {}).items():
            if v is not None:
                values[k] = v
        for item in sets or []:
            k, v = parse_set(item)
            if k not in cls.keys():
                raise TrainingConfigError(f"unknown training config key {k!r} in --set {item}")
            values[k] = v
        return cls.from_dict(values, source=str(path) if path else "arguments")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- checks -----------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        def bad(msg: str):
            raise TrainingConfigError(msg)

        for name in ("max_seq_length", "batch_t2i", "batch_lm", "batch_mmu", "grad_accum", "max_steps",
                     "warmup_steps", "save_every", "keep_checkpoints", "log_every", "val_every", "val_steps",
                     "lora_rank", "lora_layers", "quantize_group_size", "lm_max_chars", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                bad(f"{name} must be an integer, got {v!r}")
        for name in ("lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "t2i_coeff", "lm_coeff",
                     "mmu_coeff", "cond_dropout_prob", "min_masking_rate", "lora_scale", "lora_dropout", "val_guidance"):
            v = _number(getattr(self, name))
            if v is None:
                bad(f"{name} must be a number, got {getattr(self, name)!r}")
            setattr(self, name, v)
        for name in ("mmu_questions", "lora_keys", "freeze", "train_only", "val_prompts"):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                bad(f"{name} must be a list of strings, got {v!r}")
        if min(self.batch_t2i, self.batch_lm, self.batch_mmu) < 0 or self.batch_t2i + self.batch_lm + self.batch_mmu == 0:
            bad("batch sizes must be >= 0 and not all 0")
        if self.grad_accum < 1 or self.max_steps < 1 or self.keep_checkpoints < 1:
            bad("grad_accum, max_steps and keep_checkpoints must be at least 1")
        if not 0 <= self.warmup_steps < self.max_steps:
            bad(f"warmup_steps ({self.warmup_steps}) must be in [0, max_steps={self.max_steps})")
        if self.save_every < 1 or self.log_every < 1:
            bad("save_every and log_every must be at least 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            bad(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.fine_tune not in ("full", "lora"):
            bad(f"fine_tune must be 'full' or 'lora', got {self.fine_tune!r}")
        if self.quantize_bits is not None and self.fine_tune != "lora":
            bad("quantize_bits quantizes a frozen base: it needs fine_tune: lora (QLoRA)")
        if self.quantize_bits not in (None, 2, 3, 4, 5, 6, 8):
            bad(f"quantize_bits must be one of 2, 3, 4, 5, 6, 8, got {self.quantize_bits!r}")
        if not 0 <= self.cond_dropout_prob <= 1 or not 0 <= self.min_masking_rate <= 1:
            bad("cond_dropout_prob and min_masking_rate must be in [0, 1]")
        if self.max_grad_norm is not None:
            norm = _number(self.max_grad_norm)
            if norm is None or norm <= 0:
                bad(f"max_grad_norm must be a positive number or null, got {self.max_grad_norm!r}")
            self.max_grad_norm = norm
        if self.max_seq_length < 2:
            bad("max_seq_length must be at least 2")
        return self

    @property
    def micro_rows(self):
        from .losses import TaskRows

        return TaskRows(self.batch_t2i, self.batch_lm, self.batch_mmu)


WARMUP_FRACTION = 0.1  # a warm-up the user did not choose is at most this share of max_steps


def _fit_default_warmup(merged: dict[str, Any], values: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """A warm-up that comes from a preset or the default (not from the user) is cut to 10% of
    max_steps when longer: the `lora` preset's 100 steps would otherwise refuse any run of 100
    steps or fewer. Returns the note saying so (empty when nothing changed)."""
    if "warmup_steps" in values:
        return []
    warmup = merged.get("warmup_steps", defaults["warmup_steps"])
    steps = merged.get("max_steps", defaults["max_steps"])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (warmup, steps)) or steps < 1:
        return []  # validate() reports the bad value
    cap = int(steps * WARMUP_FRACTION)
    if warmup <= cap:
        return []
    merged["warmup_steps"] = cap
    origin = f"the {merged['preset']} preset's" if merged.get("preset") else "the default"
    return [f"warmup_steps: {origin} {warmup} is more than {WARMUP_FRACTION:.0%} of max_steps {steps}; "
            f"using {cap} (set warmup_steps to choose)"]


def _number(v: Any) -> float | None:
    """A float from a number or a numeric string (YAML 1.1 reads ``1e-4`` without a dot as text)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingConfigError(f"training config {path} not found") from None
    except yaml.YAMLError as e:
        raise TrainingConfigError(f"{path} is not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TrainingConfigError(f"{path} must be a YAML mapping of key: value")
    return values


def parse_set(item: str) -> tuple[str, Any]:
    """``key=value`` with a YAML value (numbers, booleans, null and [lists] work as in the file)."""
    if "=" not in item:
        raise TrainingConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value
