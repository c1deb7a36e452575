"""The reference's training stages (the official `configs/showo_pretraining_stage*.yaml` and
`configs/showo_instruction_tuning_*.yaml`) as presets for `preset:` in a training YAML.

Numbers are the official configs' — learning rate, warm-up, steps, text length, and the **per-GPU**
batch sizes t2i/lm/mmu — so one Mac (or each Mac of a data-parallel run) trains with one reference
GPU's share of the batch. The reference ran 8 GPUs per node (stage 1–3 on several nodes), so its
global batch was 8× (or more) larger: set ``grad_accum`` (or add Macs) to match it. Everything not
listed keeps the TrainConfig default (AdamW 0.9/0.999/1e-8/0.01, cosine, coefficients 1/0.1/1,
condition dropout 0.1, seed 10086).

On a Mac the presets also switch on what makes the full model fit: bf16 compute (fp32 master
weights) and gradient checkpointing. ``lora`` is not a reference stage: it is the small-memory
fine-tune of a released checkpoint on your own data.

The stages chain like the reference's (`output_dir` of one stage is the next one's starting point):
stage 1 starts from Phi-1.5 (``init:``, built as `showo init` does, into RUN/init), every later
stage from the previous stage's result folder ``runs/<previous stage>/model``. An explicit
``model:`` (YAML or ``--model``) replaces the chained start, e.g. ``--model showlab/show-o``.
"""

from __future__ import annotations

from typing import Any

_MAC = {"dtype": "bfloat16", "grad_checkpoint": True}

PRESETS: dict[str, dict[str, Any]] = {
    # Phi-1.5 init in the reference (load_from_showo: False); ImageNet class names as prompts.
    "pretraining_stage1": {
        **_MAC, "max_seq_length": 128, "batch_t2i": 15, "batch_lm": 4, "batch_mmu": 10,
        "lr": 1e-4, "warmup_steps": 5000, "max_steps": 500_000, "val_guidance": 1.5,
        "init": "microsoft/phi-1_5", "output": "runs/pretraining_stage1",
    },
    "pretraining_stage2": {
        **_MAC, "max_seq_length": 128, "batch_t2i": 10, "batch_lm": 4, "batch_mmu": 10,
        "lr": 1e-4, "warmup_steps": 5000, "max_steps": 1_000_000, "val_guidance": 0.0,
        "model": "runs/pretraining_stage1/model", "output": "runs/pretraining_stage2",
    },
    "pretraining_stage3": {
        **_MAC, "max_seq_length": 128, "batch_t2i": 10, "batch_lm": 4, "batch_mmu": 10,
        "lr": 2e-5, "warmup_steps": 5000, "max_steps": 50_000, "val_guidance": 0.0,
        "model": "runs/pretraining_stage2/model", "output": "runs/pretraining_stage3",
    },
    # LLaVA-pretrain 558k as mmu data (MAGVIT tokens).
    "instruction_tuning_1": {
        **_MAC, "max_seq_length": 381, "batch_t2i": 4, "batch_lm": 2, "batch_mmu": 7,
        "lr": 2e-5, "warmup_steps": 1000, "max_steps": 10_000, "val_guidance": 0.0,
        "model": "runs/pretraining_stage3/model", "output": "runs/instruction_tuning_1",
    },
    # LLaVA-v1.5 mix665k as mmu data.
    "instruction_tuning_2": {
        **_MAC, "max_seq_length": 381, "batch_t2i": 4, "batch_lm": 2, "batch_mmu": 6,
        "lr": 5e-5, "warmup_steps": 1000, "max_steps": 14_000, "val_guidance": 0.0,
        "model": "runs/instruction_tuning_1/model", "output": "runs/instruction_tuning_2",
    },
    # Not a reference stage: LoRA on a released checkpoint, sized for a 16-32 GB Mac.
    "lora": {
        **_MAC, "fine_tune": "lora", "max_seq_length": 128, "batch_t2i": 2, "batch_lm": 0, "batch_mmu": 2,
        "lr": 1e-4, "warmup_steps": 100, "max_steps": 2000, "lora_rank": 16, "lora_scale": 2.0,
        "val_guidance": 1.75,
    },
}


# stage → the stage whose result it starts from
PREVIOUS_STAGE = {
    "pretraining_stage2": "pretraining_stage1",
    "pretraining_stage3": "pretraining_stage2",
    "instruction_tuning_1": "pretraining_stage3",
    "instruction_tuning_2": "instruction_tuning_1",
}


def chained_model_hint(name: str | None, model: str) -> str | None:
    """The error for a chained start that does not exist yet (None if `model` is not the chain's)."""
    if name not in PREVIOUS_STAGE or model != PRESETS[name].get("model"):
        return None
    return (f"preset {name} starts from the result of {PREVIOUS_STAGE[name]}, {model}, which does not exist; "
            f"train that stage first, or pass --model (e.g. showlab/show-o)")


def preset(name: str) -> dict[str, Any]:
    from ..errors import TrainingConfigError

    if name not in PRESETS:
        raise TrainingConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name])
