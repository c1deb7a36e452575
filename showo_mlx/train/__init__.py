"""Training Show-o with MLX: the reference's three losses, data, trainer, LoRA, data parallel.

Modules (one job each):
  losses.py       the three cross-entropy losses of `Showo.forward` (t2i unshifted, lm/mmu shifted)
  masking.py      image-token masking as `mask_or_random_replace_tokens` (cosine schedule, injectable RNG)
  sources.py      raw datasets: image-caption folders/JSONL, class folders, tar shards, text, LLaVA
  prepare.py      `showo prepare`: images → MAGVIT codes once, sharded, streaming, atomic
  data.py         prepared data + text data, deterministic sharded sampling
  batches.py      one mixed [t2i | lm | mmu] batch per micro-step (prompts, labels, layouts)
  conversation.py LLaVA conversations → MAGVIT-path mmu text and labels
  config.py       TrainConfig: YAML + presets + --set, unknown keys refused
  presets.py      the reference stages (the official `configs/*.yaml`) as presets
  lora.py         LoRA layers (mlx-lm's LoRALinear), adapters on disk, fusing
  distributed.py  data parallel over mx.distributed (ring backend via mlx.launch)
  checkpoint.py   atomic checkpoints (weights/adapters, optimizer, step, run id) and resume checks
  runfolder.py    the run folder: one run per folder (run id, lock), status.json, the step log
  trainer.py      the loop: AdamW + warm-up/cosine, accumulation, clipping, bf16, checkpointing
  validate.py     optional sample images during training
  export.py       a trained transformer written as a normal converted model folder
  init.py         `showo init`: the stage-1 start built from microsoft/phi-1_5
  cli.py          typer commands prepare / train / fuse, registered on the main app
"""

from .losses import IGNORE_ID, TaskRows, reference_losses
from .masking import mask_image_tokens

__all__ = ["IGNORE_ID", "TaskRows", "reference_losses", "mask_image_tokens"]
