"""Sample images during training (optional, every `val_every` steps, rank 0 only).

Uses the same building blocks as generation — prefix-cached image logits (t2i.py), the MaskGIT
loop (maskgit.py), the MAGVIT decoder — on the model being trained. Any failure (missing decoder
weights, a generation API that changed) turns validation off with one warning instead of stopping a
long training run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np


class Sampler:
    def __init__(self, model_folder: Path, model_config: dict, prompting, *, prompts: list[str], steps: int, guidance: float, seed: int, log: Callable[[str], None]):
        self.folder, self.config, self.prompting = model_folder, model_config, prompting
        self.prompts, self.steps, self.guidance, self.seed = prompts, steps, guidance, seed
        self.log = log
        self.vq = None
        self.enabled = bool(prompts)

    def __call__(self, model, step: int, out_dir: Path) -> list[Path]:
        if not self.enabled:
            return []
        try:
            return self._sample(model, step, out_dir)
        except Exception as e:  # validation must never kill training
            self.enabled = False
            self.log(f"warning: validation images disabled ({type(e).__name__}: {' '.join(str(e).split())[:160]})")
            return []

    def _sample(self, model, step: int, out_dir: Path) -> list[Path]:
        import mlx.core as mx

        from ..images import save_png, to_uint8
        from ..loading import load_magvit
        from ..maskgit import KeyedRandomness, decode_image_tokens
        from ..t2i import CachedImageLogits

        if self.vq is None:
            self.vq = load_magvit(self.folder, self.config, with_encoder=False)
        cfg = model.config
        p = self.prompting
        n = cfg.num_vq_tokens
        init = np.full((len(self.prompts), n), p.ids.mask, dtype=np.int64)
        cond = p.t2i_gen(self.prompts, init)
        was_training = model.training
        model.eval()
        try:
            logits_fn = CachedImageLogits(model, p, cond, self.guidance)
            codes = decode_image_tokens(
                logits_fn, init, steps=self.steps, mask_token_id=p.ids.mask, image_token_offset=p.ids.image_offset,
                codebook_size=cfg.codebook_size, randomness=KeyedRandomness(self.seed),
            )
            pixels = self.vq.decode(codes, shape=cfg.image_grid)
            mx.eval(pixels)
        finally:
            if was_training:
                model.train()
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, (prompt, image) in enumerate(zip(self.prompts, to_uint8(pixels))):
            paths.append(save_png(image, out_dir / f"step-{step:08d}-{i}.png", {"prompt": prompt, "step": step}))
        return paths
