"""Training Show-o with MLX: the reference's three losses, data, trainer, LoRA, data parallel.

Modules (one job each):
  losses.py       the three cross-entropy losses of spec §8.1 (t2i unshifted, lm/mmu shifted)
  masking.py      image-token masking of spec §8.2 (cosine schedule, injectable RNG)
  sources.py      raw datasets: image-caption folders/JSONL, class folders, tar shards, text, LLaVA
  prepare.py      `showo prepare`: images → MAGVIT codes once, sharded, streaming, atomic
  data.py         prepared data + text data, deterministic sharded sampling
  batches.py      one mixed [t2i | lm | mmu] batch per micro-step (prompts, labels, layouts)
  config.py       TrainConfig: YAML + presets + --set, unknown keys refused
  presets.py      the reference stages (spec §8.3) as presets
  lora.py         LoRA layers (mlx-lm's LoRALinear), adapters on disk, fusing
  distributed.py  data parallel over mx.distributed (ring backend via mlx.launch)
  checkpoint.py   atomic checkpoints (weights/adapters, optimizer, step, run id) and resume checks
  runfolder.py    the run folder: one run per folder (run id, lock), status.json, the step log
  trainer.py      the loop: AdamW + warm-up/cosine, accumulation, clipping, bf16, checkpointing
  validate.py     optional sample images during training
  cli.py          typer commands prepare / train / fuse, registered on the main app
"""

from .losses import IGNORE_ID, TaskRows, reference_losses
from .masking import mask_image_tokens

__all__ = ["IGNORE_ID", "TaskRows", "reference_losses", "mask_image_tokens"]
