"""TrainConfig: every training setting, read from YAML with presets and ``--set key=value``.

Precedence, lowest first: dataclass defaults < ``preset:`` < the YAML's own keys < command-line
flags (--model/--data/--lora) < ``--set``. An unknown key anywhere is refused by name, so a typo
never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import TrainingConfigError
from .presets import preset as preset_values

# Bounds on what a config file may make us do. A training YAML is a few hundred bytes; PyYAML's
# time grows faster than linearly with size and with bracket nesting (a 100 KB flow list took 3.5 s
# here, 4000 nested "[" 6 s), and aliases ("&a [*b, *b, ...]") can make a tiny file describe
# billions of values ("billion laughs").
MAX_YAML_BYTES = 64 << 10  # room for ~1000 prompts
MAX_YAML_DEPTH = 32  # nested [ ] / { } (a training config needs 2)
MAX_YAML_VALUES = 100_000  # values after expanding every alias
MAX_SEQ_LENGTH = 8192  # above any Show-o position table (2048); the model's limit is checked at load

DEFAULT_LORA_KEYS = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2",
]


@dataclass
class TrainConfig:
    preset: str | None = None
    # -- what to train on
    model: str = "showlab/show-o"
    init: str | dict | None = None  # build the start from Phi-1.5 instead (stage 1; see train/init.py)
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
    # -- objective (official `training/train.py`; `training/utils.py`, `mask_or_random_replace_tokens`)
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
    # -- failure handling
    max_nonfinite_steps: int = 3  # consecutive NaN/Inf steps (skipped) before the run stops (exit 3)
    collective_timeout: float = 600.0  # seconds a rank may wait in one collective (0 = forever)
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
    # -- benchmark during training (showo_mlx/eval): a VQA set, scored every eval_every steps
    eval_every: int = 0
    eval_data: str | None = None
    eval_limit: int = 200

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        unknown = sorted(str(k) for k in set(values) - set(cls.keys()))
        if unknown:
            raise TrainingConfigError(f"unknown training config key {_show(unknown[0])} in {source}; valid keys: see docs/TRAINING.md")
        merged: dict[str, Any] = {}
        if values.get("preset") is not None and not isinstance(values["preset"], str):
            raise TrainingConfigError(f"preset must be a preset name, got {_show(values['preset'])}")
        if values.get("preset"):
            merged.update(preset_values(values["preset"]))
        if values.get("model") is not None and values.get("init") is not None:
            raise TrainingConfigError("init and model are both set: init builds the starting model from Phi-1.5, model names one; keep one")
        if values.get("model") is not None:
            merged.pop("init", None)  # an explicit start replaces the preset's Phi-1.5 init
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
                     "lora_rank", "lora_layers", "quantize_group_size", "lm_max_chars", "seed", "val_seed",
                     "max_nonfinite_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                bad(f"{name} must be an integer, got {_show(v)}")
        for name in ("lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "t2i_coeff", "lm_coeff",
                     "mmu_coeff", "cond_dropout_prob", "min_masking_rate", "lora_scale", "lora_dropout", "val_guidance",
                     "collective_timeout"):
            v = _number(getattr(self, name))
            if v is None or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {_show(getattr(self, name))}")
            setattr(self, name, v)
        for name in ("mmu_questions", "lora_keys", "freeze", "train_only", "val_prompts"):
            v = getattr(self, name)
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                bad(f"{name} must be a list of strings, got {_show(v)}")
        for name, optional in (("model", False), ("output", False), ("data", True), ("mmu_data", True),
                               ("lm_data", True), ("preset", True)):
            v = getattr(self, name)
            if not (isinstance(v, str) and v) and not (optional and v is None):
                bad(f"{name} must be a non-empty string{' or null' if optional else ''}, got {_show(v)}")
        for name in ("grad_checkpoint", "progress"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be true or false, got {_show(getattr(self, name))}")
        # Ranges the optimizer and the random generators need; outside them MLX or numpy fail
        # mid-run with a traceback, or training silently goes the wrong way (a negative lr ascends).
        for name in ("seed", "val_seed"):
            if not 0 <= getattr(self, name) < 2**64:
                bad(f"{name} must be in [0, 2**64), got {getattr(self, name)}")
        if self.lr < 0 or self.weight_decay < 0:
            bad(f"lr and weight_decay must be >= 0, got lr {self.lr:g}, weight_decay {self.weight_decay:g}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            bad(f"adam_beta1 and adam_beta2 must be in [0, 1), got {self.adam_beta1:g}, {self.adam_beta2:g}")
        if self.adam_eps <= 0:
            bad(f"adam_eps must be > 0, got {self.adam_eps:g}")
        if min(self.t2i_coeff, self.lm_coeff, self.mmu_coeff) < 0:
            bad("t2i_coeff, lm_coeff and mmu_coeff must be >= 0")
        if not 0 <= self.lora_dropout < 1:
            bad(f"lora_dropout must be in [0, 1), got {self.lora_dropout:g}")
        if self.lora_rank < 1 or not (self.lora_layers == -1 or self.lora_layers >= 1):
            bad("lora_rank must be at least 1 and lora_layers -1 (all) or at least 1")
        if self.val_every < 0 or self.val_steps < 1 or self.lm_max_chars < 1:
            bad("val_every must be >= 0, val_steps and lm_max_chars at least 1")
        if self.max_nonfinite_steps < 1:
            bad(f"max_nonfinite_steps must be at least 1, got {self.max_nonfinite_steps}")
        if self.collective_timeout < 0:
            bad(f"collective_timeout must be >= 0 seconds (0 = no timeout), got {self.collective_timeout:g}")
        if min(self.batch_t2i, self.batch_lm, self.batch_mmu) < 0 or self.batch_t2i + self.batch_lm + self.batch_mmu == 0:
            bad("batch sizes must be >= 0 and not all 0")
        if self.grad_accum < 1 or self.max_steps < 1 or self.keep_checkpoints < 1:
            bad("grad_accum, max_steps and keep_checkpoints must be at least 1")
        if not 0 <= self.warmup_steps < self.max_steps:
            bad(f"warmup_steps ({self.warmup_steps}) must be in [0, max_steps={self.max_steps})")
        if self.save_every < 1 or self.log_every < 1:
            bad("save_every and log_every must be at least 1")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            bad(f"dtype must be float32, bfloat16 or float16, got {_show(self.dtype)}")
        if self.fine_tune not in ("full", "lora"):
            bad(f"fine_tune must be 'full' or 'lora', got {_show(self.fine_tune)}")
        if self.quantize_bits is not None and self.fine_tune != "lora":
            bad("quantize_bits quantizes a frozen base: it needs fine_tune: lora (QLoRA)")
        if self.quantize_bits not in (None, 2, 3, 4, 5, 6, 8):
            bad(f"quantize_bits must be one of 2, 3, 4, 5, 6, 8, got {_show(self.quantize_bits)}")
        if not 0 <= self.cond_dropout_prob <= 1 or not 0 <= self.min_masking_rate <= 1:
            bad("cond_dropout_prob and min_masking_rate must be in [0, 1]")
        if self.max_grad_norm is not None:
            norm = _number(self.max_grad_norm)
            if norm is None or not math.isfinite(norm) or norm <= 0:
                bad(f"max_grad_norm must be a positive number or null, got {_show(self.max_grad_norm)}")
            self.max_grad_norm = norm
        if not 2 <= self.max_seq_length <= MAX_SEQ_LENGTH:
            # The model's own limit (rows must fit its position table) is checked once it is loaded.
            bad(f"max_seq_length must be in [2, {MAX_SEQ_LENGTH}], got {self.max_seq_length}")
        if self.init is not None:
            from .init import InitSpec

            InitSpec.from_value(self.init)
        for name in ("eval_every", "eval_limit"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                bad(f"{name} must be an integer, got {v!r}")
        if self.eval_every < 0 or self.eval_limit < 1:
            bad("eval_every must be >= 0 and eval_limit >= 1")
        if self.eval_every and not self.eval_data:
            bad("eval_every needs eval_data (a POPE/MME/GQA folder or Hub dataset id)")
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
    if isinstance(v, (int, float, str)):
        try:
            return float(v)
        except (ValueError, OverflowError):  # not a number, or an int beyond float range
            return None
    return None


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 4, 4, 2


def _show(value: Any) -> str:
    """A bounded repr for error messages (a value can be a huge or deeply shared structure)."""
    return _short.repr(value)


class YamlLimitError(TrainingConfigError):
    """A YAML document beyond the bounds (alias expansion, recursion, nesting)."""


class BoundedLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when built with it
    """PyYAML's SafeLoader (no tags that build objects) that refuses documents whose aliases
    expand to more than MAX_YAML_VALUES values, and recursive aliases. SafeLoader itself shares
    aliased values instead of copying them, so loading is quick, but anything that later walks or
    prints the value (validation messages, ``dataclasses.asdict``, ``json.dumps``) does the
    exponential work; counting the expanded size on the node graph first is linear."""

    def construct_document(self, node):
        _check_expanded_size(node)
        return super().construct_document(node)


def _check_expanded_size(root: yaml.Node) -> None:
    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    sizes: dict[int, int] = {}  # expanded size of each finished node, by identity
    open_nodes: set[int] = set()  # nodes on the current path: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative post-order walk: deep nesting cannot exhaust the Python stack
        node, finished = stack.pop()
        key = id(node)
        if finished:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children(node))
            if sizes[key] > MAX_YAML_VALUES:
                raise YamlLimitError(
                    f"the YAML's aliases expand to more than {MAX_YAML_VALUES:,} values; write the values out instead"
                )
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise YamlLimitError("the YAML has a recursive alias (a value that contains itself)")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if id(c) not in sizes)


def _check_text_bounds(text: str, source: str) -> None:
    if len(text) > MAX_YAML_BYTES:
        raise YamlLimitError(f"{source} is larger than {MAX_YAML_BYTES >> 10} KiB; a training config is a few lines of YAML")
    depth = deepest = 0
    for m in _BRACKETS.finditer(text):  # an upper bound: brackets inside quoted strings count too
        depth = max(0, depth + (1 if m.group() in "[{" else -1))
        deepest = max(deepest, depth)
    if deepest > MAX_YAML_DEPTH:
        raise YamlLimitError(f"{source} is nested too deeply to be a training config (more than {MAX_YAML_DEPTH} brackets)")


_BRACKETS = re.compile(r"[\[\]{}]")


def load_yaml_text(text: str, source: str) -> Any:
    """Parse one YAML document with BoundedLoader; every failure is a one-line TrainingConfigError."""
    _check_text_bounds(text, source)
    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise TrainingConfigError(f"{source} is not valid YAML ({' '.join(str(e).split())[:200]})") from None
    except (ValueError, OverflowError) as e:  # e.g. a timestamp like 2020-99-99
        raise TrainingConfigError(f"{source} holds a value YAML cannot read ({' '.join(str(e).split())[:120]})") from None
    except RecursionError:
        raise YamlLimitError(f"{source} is nested too deeply to be a training config") from None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        if not path.is_file():
            what = "not found" if not path.exists() else "not a regular file"
            raise TrainingConfigError(f"training config {path} {what}; pass a YAML file")
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as e:
        raise TrainingConfigError(f"training config {path} cannot be read ({e.strerror or e})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise YamlLimitError(f"training config {path} is larger than {MAX_YAML_BYTES >> 10} KiB; a config is a few lines of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TrainingConfigError(f"training config {path} is not UTF-8 text (a binary file?); pass a YAML file") from None
    values = load_yaml_text(text, str(path))
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
        value = load_yaml_text(raw, f"--set {key}") if raw.strip() else ""
    except YamlLimitError:
        raise
    except TrainingConfigError:
        value = raw  # not YAML: the text itself
    return key.strip(), value
