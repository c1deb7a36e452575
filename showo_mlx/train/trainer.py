"""The training loop (the official `training/train.py`, with what one Mac or a few need on top).

Per optimizer step:
  1. every micro-step of every rank builds its mixed batch ``[t2i | lm | mmu]`` (batches.py);
  2. the labelled positions are counted per task and summed over micro-steps and ranks, so each
     task's loss is the mean over *all* of the step's labelled tokens — accumulation and data
     parallel are then exactly one big batch (for one process and one micro-step this is the
     reference's per-task mean, bit for bit the same definition);
  3. forward/backward per micro-step, gradients summed, averaged over ranks (distributed.py),
     optionally clipped (optim.clip_grad_norm), AdamW applied with the warm-up + cosine schedule.

Precision: parameters that train are float32 master weights. With ``dtype: bfloat16`` they are cast
to bf16 inside the differentiated function, so the forward/backward run in bf16 while the
gradients arrive in float32 on the masters and AdamW's moments stay float32. Logits and the
cross-entropy are float32. Frozen weights (the LoRA base) are simply stored in bf16.

Gradient checkpointing: each block runs under `mx.checkpoint` with its trainable parameters passed
as explicit inputs (closed-over parameters would get no gradient), so block activations are
recomputed in the backward pass instead of kept.

Non-finite values: every step checks the loss sums (already on the host) and the gradient norm (one
reduction over the gradients, also what clipping needs). A step with NaN/Inf is skipped — no
update, the optimizer state untouched, its batch consumed — and counted; `max_nonfinite_steps` in a
row stop the run with TrainingDivergedError (exit code 3). Checkpoints refuse non-finite weights, so
the last good ones stay. The run folder (runfolder.py) records who owns it and how the run ended.

AdamW mirrors the reference's parameter groups (`training/train.py`, `main`): its "no decay" name filter only
matches biases in this model, so LayerNorm weights and embeddings ARE decayed; only names containing
"bias" are not. torch's AdamW has bias correction, hence ``bias_correction=True``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..attention import attention_mask
from ..errors import DistributedError, ShowoError, TrainingConfigError, TrainingDivergedError
from . import runfolder
from .batches import BatchBuilder, MicroBatch
from .checkpoint import (
    check_resume, first_non_finite, latest_checkpoint, load_checkpoint, model_fingerprint, resolve_resume, save_checkpoint,
)
from .config import TrainConfig
from .data import PreparedData, TextData
from .distributed import World, init_world
from .losses import TASKS, loss_targets, token_cross_entropy

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


# -- pieces that are useful on their own ------------------------------------------------------------
def lr_schedule(lr: float, warmup_steps: int, max_steps: int) -> Callable:
    """transformers' get_cosine_schedule_with_warmup: lr·s/w for s < w, then
    lr·½(1 + cos(π·(s − w)/(T − w))), reaching 0 at T. Evaluated at the optimizer's step count
    before it is incremented, like the reference's scheduler stepped after each update."""
    decay = optim.cosine_decay(lr, max_steps - warmup_steps, 0.0)
    if warmup_steps == 0:
        return decay
    return optim.join_schedules([optim.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])


def build_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    schedule = lr_schedule(cfg.lr, cfg.warmup_steps, cfg.max_steps)

    def adamw(wd: float) -> optim.AdamW:
        return optim.AdamW(
            learning_rate=schedule, betas=[cfg.adam_beta1, cfg.adam_beta2], eps=cfg.adam_eps,
            weight_decay=wd, bias_correction=True,
        )

    # First optimizer: everything whose name has no "bias" (decayed); the fallback: biases.
    return optim.MultiOptimizer([adamw(cfg.weight_decay), adamw(0.0)], filters=[lambda path, _: "bias" not in path])


def apply_freeze(model: nn.Module, freeze: list[str], train_only: list[str]) -> None:
    """Freeze parameters by name pattern (fnmatch, e.g. ``embed_tokens.*``, ``layers.0.*``)."""
    if not freeze and not train_only:
        return
    for path, module in model.named_modules():
        for leaf, value in module.items():
            if not isinstance(value, mx.array):
                continue
            name = f"{path}.{leaf}" if path else leaf
            frozen = any(fnmatch.fnmatchcase(name, p) for p in freeze)
            if train_only and not any(fnmatch.fnmatchcase(name, p) for p in train_only):
                frozen = True
            if frozen:
                module.freeze(recurse=False, keys=[leaf], strict=False)


def forward_hidden(model, ids: mx.array, mask, checkpoint: bool, input_embeddings: mx.array | None = None) -> mx.array:
    """Final-LayerNorm hidden states; the same computation as `model.hidden_states` without a
    cache, with real gradient checkpointing when asked."""
    x = model.embed_tokens(ids) if input_embeddings is None else input_embeddings
    for layer in model.layers:
        if checkpoint:
            def block(params, x, layer=layer):
                layer.update(params)
                return layer(x, mask)

            x = mx.checkpoint(block)(layer.trainable_parameters(), x)
        else:
            x = layer(x, mask)
    return model.final_layernorm(x)


def _signature(params: dict) -> str:
    names = sorted(f"{k}:{tuple(v.shape)}" for k, v in tree_flatten(params))
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:24]


@dataclass
class StepRecord:
    step: int
    losses: dict[str, float | None]
    loss: float
    lr: float
    tokens_per_s: float
    peak_memory_gb: float
    grad_norm: float | None = None
    skipped: bool = False  # non-finite loss or gradient: the update was not applied

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loss": self.loss, **{f"loss_{k}": v for k, v in self.losses.items()},
                "lr": self.lr, "tokens_per_s": self.tokens_per_s, "peak_memory_gb": self.peak_memory_gb,
                "grad_norm": self.grad_norm, "skipped": self.skipped}


@dataclass
class TrainResult:
    steps: int
    history: list[StepRecord] = field(default_factory=list)
    output: Path | None = None  # adapters folder (LoRA) or model folder (full)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: bool = False,
        force: bool = False,
        world: World | None = None,
        log: Callable[[str], None] = print,
        callback: Callable[[StepRecord], None] | None = None,
    ):
        self.cfg = cfg
        self.world = world or init_world(cfg.collective_timeout)
        self.world.set_timeout(cfg.collective_timeout)
        self.log = log if self.world.is_main else (lambda *_: None)
        self.callback = callback
        self.run_dir = Path(cfg.output)
        self.resume, self.force = resume, force
        self.run_id: str | None = None  # set when the run starts (or from the folder when resuming)
        self.start_step = self.step = 0
        self.nonfinite_streak = self.nonfinite_total = 0
        self.world.agree(self._catch(self._setup), "setup")
        if resume:
            self._resume()

    @staticmethod
    def _catch(fn: Callable[[], None]) -> ShowoError | None:
        try:
            fn()
        except ShowoError as e:
            return e
        return None

    def _setup(self) -> None:
        if self.world.is_main:  # before the model loads: refuse another run's folder cheaply
            runfolder.check_run_folder(self.run_dir, resume=self.resume, force=self.force)
        self._setup_model()
        self._setup_data()
        self.optimizer = build_optimizer(self.cfg)
        self.schedule = lr_schedule(self.cfg.lr, self.cfg.warmup_steps, self.cfg.max_steps)
        self._value_and_grad = mx.value_and_grad(self._loss)

    # -- setup ------------------------------------------------------------------------------------
    def _setup_model(self) -> None:
        from ..config import ShowoConfig
        from ..convert import QuantizeSpec, quantize_transformer
        from ..loading import load_transformer, read_model_config
        from ..prompting import Prompting
        from .lora import apply_lora, freeze_for_lora

        cfg = self.cfg
        from .init import starting_model

        self.model_folder = starting_model(cfg, self.world, self.run_dir, self.log)  # `init:` or `model:`
        self.model_config = read_model_config(self.model_folder)
        showo = ShowoConfig.from_dict({**self.model_config["showo"], "max_seq_length": cfg.max_seq_length})
        row = cfg.max_seq_length + 1 + showo.num_vq_tokens + 2  # a t2i row (batches.py): every row's length
        if row > showo.max_position_embeddings:
            raise TrainingConfigError(
                f"max_seq_length {cfg.max_seq_length} makes rows of {row} tokens but the model has "
                f"{showo.max_position_embeddings} positions; use max_seq_length <= "
                f"{showo.max_position_embeddings - showo.num_vq_tokens - 3}"
            )
        self.showo = showo
        self.prompting = Prompting(self.model_folder, showo)
        model = load_transformer(self.model_folder, self.model_config)
        self.base_fingerprint = model_fingerprint(model)
        # w_clip_vit models: the frozen CLIP tower feeds the mmu rows; the projector (part of the
        # transformer) trains, and gets adapters too under LoRA (train_w_clip_vit.py trains it).
        self.vision = None
        self.lora_keys = list(cfg.lora_keys)
        if showo.w_clip_vit:
            from ..vision import load_vision

            self.vision = load_vision(self.model_folder, self.model_config)
            if "mm_projector.*" not in self.lora_keys:
                self.lora_keys.append("mm_projector.*")
        self.quantization = self.model_config.get("quantization")
        self.quantize_at_load = None
        if cfg.fine_tune == "full":
            if self.quantization:
                raise TrainingConfigError(f"{cfg.model} is quantized; full fine-tuning needs a float model (or use --lora for QLoRA)")
        else:
            if cfg.quantize_bits:
                if self.quantization:
                    raise TrainingConfigError(f"{cfg.model} is already quantized; drop quantize_bits")
                spec = QuantizeSpec(bits=cfg.quantize_bits, group_size=cfg.quantize_group_size).validate()
                self.quantization = quantize_transformer(model, spec)
                self.quantize_at_load = {"bits": spec.bits, "group_size": spec.group_size}
            mx.random.seed(cfg.seed)  # LoRA's A matrices are random: make them reproducible
            n = apply_lora(model, rank=cfg.lora_rank, scale=cfg.lora_scale, dropout=cfg.lora_dropout,
                           keys=self.lora_keys, num_layers=cfg.lora_layers)
            freeze_for_lora(model)
            self.log(f"LoRA on {n} layers (rank {cfg.lora_rank}, scale {cfg.lora_scale})"
                     + (f" over a {cfg.quantize_bits}-bit base" if cfg.quantize_bits else ""))
        apply_freeze(model, cfg.freeze, cfg.train_only)
        self.params = tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters())
        self._order = [k for k, _ in tree_flatten(self.params)]
        if not tree_flatten(self.params):
            raise TrainingConfigError("nothing to train: every parameter is frozen (check freeze / train_only)")
        self.compute_dtype = DTYPES[cfg.dtype]
        trainable = {k for k, _ in tree_flatten(self.params)}
        frozen = [(k, v) for k, v in tree_flatten(model.parameters()) if k not in trainable]
        # Full fine-tuning keeps float32 copies of frozen weights for the saved model.
        self.frozen_master = dict(frozen) if cfg.fine_tune == "full" else {}
        if self.compute_dtype != mx.float32:
            model.update(tree_unflatten([(k, v.astype(self.compute_dtype)) for k, v in frozen if mx.issubdtype(v.dtype, mx.floating)]))
        model.update(self.params)
        model.train()
        self.model = model
        mx.eval(model.parameters())
        total = sum(v.size for _, v in tree_flatten(model.parameters()))
        n_train = sum(v.size for _, v in tree_flatten(self.params))
        self.log(f"training {n_train / 1e6:.2f}M of {total / 1e6:.2f}M parameters ({cfg.fine_tune}, compute {cfg.dtype})")

    def _setup_data(self) -> None:
        cfg = self.cfg
        rows = cfg.micro_rows
        t2i = mmu = lm = None
        showo = self.showo

        def prepared(path: str, what: str) -> PreparedData:
            d = PreparedData(path)
            d.check_model(showo.num_vq_tokens, showo.codebook_size, what)
            return d

        if rows.t2i:
            if not cfg.data:
                raise TrainingConfigError("batch_t2i > 0 needs data: (prepared image-caption data); or set batch_t2i: 0")
            t2i = prepared(cfg.data, "data")
            if t2i.kind != "captions":
                raise TrainingConfigError(f"data {cfg.data} holds conversations; t2i rows need captions")
        if rows.mmu:
            source = cfg.mmu_data or cfg.data
            if not source:
                raise TrainingConfigError("batch_mmu > 0 needs mmu_data (or data); or set batch_mmu: 0")
            if self.vision is not None:  # CLIP rows read the prepared CLIP crops, not MAGVIT codes
                mmu = PreparedData(source)
                mmu.check_clip("mmu_data")
            else:
                mmu = t2i if (source == cfg.data and t2i is not None) else prepared(source, "mmu_data")
        if rows.lm:
            if not cfg.lm_data:
                raise TrainingConfigError("batch_lm > 0 needs lm_data (a .txt or .jsonl of documents); or set batch_lm: 0")
            lm = TextData(cfg.lm_data)
        self.batches = BatchBuilder(
            self.prompting, rows=rows, t2i_data=t2i, mmu_data=mmu, lm_data=lm, seed=cfg.seed,
            cond_dropout_prob=cfg.cond_dropout_prob, min_masking_rate=cfg.min_masking_rate,
            mmu_questions=cfg.mmu_questions, lm_max_chars=cfg.lm_max_chars,
            grad_accum=cfg.grad_accum, world=self.world.size,
            clip_image_tokens=self.vision.tower.config.num_patches if self.vision is not None else None,
        )
        self.data_identity = {k: (d.identity() if d is not None else None) for k, d in (("t2i", t2i), ("mmu", mmu), ("lm", lm))}

    def _canonical(self, params: dict) -> dict:
        """The parameter tree with its keys in the model's own order. MultiOptimizer rebuilds the
        tree with mlx.utils.tree_merge, whose dict order follows a set of the keys (string-hash
        order, different in every process); a fixed order keeps gradients, checkpoints and the
        data-parallel reduction laid out identically everywhere."""
        flat = dict(tree_flatten(params))
        return tree_unflatten([(k, flat[k]) for k in self._order])

    # -- the differentiated function --------------------------------------------------------------
    def _loss(self, params, ids, mask, positions, targets, onehot, weights, features=None, image_start=0):
        dt = self.compute_dtype
        self.model.update(params if dt == mx.float32 else tree_map(lambda p: p.astype(dt), params))
        emb = None
        if features is not None:  # CLIP mmu rows (the last rows): projected features over the placeholders
            x = self.model.embed_tokens(ids)
            b, n = features.shape[0], features.shape[1]
            proj = self.model.mm_projector(features.astype(x.dtype))
            rows = mx.concatenate([x[-b:, :image_start], proj, x[-b:, image_start + n:]], axis=1)
            emb = mx.concatenate([x[:-b], rows], axis=0) if x.shape[0] > b else rows
        h = forward_hidden(self.model, ids, mask, self.cfg.grad_checkpoint, input_embeddings=emb)
        h = h.reshape(-1, h.shape[-1])[positions]
        ce = token_cross_entropy(self.model.lm_head(h), targets)
        sums = ce @ onehot  # (3,) per-task sums
        return (sums * weights).sum(), sums

    def _micro_inputs(self, mb: MicroBatch, targets):
        onehot = mx.array((targets.tasks[:, None] == np.arange(3)[None, :]).astype(np.float32))
        # The boolean mask, not the OmniMask: on Apple silicon an OmniMask selects the fused Metal
        # kernel, which has no backward pass; MLX's SDPA with a boolean mask is differentiable.
        mask = attention_mask(mb.layouts)
        mask = mask.array if mask is not None else None
        return (mx.array(mb.ids.astype(np.int32)), mask,
                mx.array(targets.positions), mx.array(targets.targets), onehot)

    # -- one optimizer step -----------------------------------------------------------------------
    def gradients(self, step: int) -> tuple[dict, np.ndarray, np.ndarray, int]:
        """The step's gradient of the global-batch loss (already reduced over ranks), the per-task
        CE sums and labelled-token counts over the global batch, and the tokens processed."""
        cfg, world = self.cfg, self.world
        world.step = step
        mx.random.seed((cfg.seed * 1_000_003 + step) % (2**32))  # LoRA dropout: a function of the step
        micro = [self.batches.build(step, world.rank, a) for a in range(cfg.grad_accum)]
        targets = [loss_targets(mb.labels, mb.rows, cfg.max_seq_length) for mb in micro]
        counts = world.all_sum(np.sum([t.counts for t in targets], axis=0).astype(np.float64))
        coeffs = np.array([cfg.t2i_coeff, cfg.lm_coeff, cfg.mmu_coeff])
        # Each rank divides by the global count; ×world undoes average_gradients' mean over ranks.
        weights = mx.array(np.where(counts > 0, coeffs * world.size / np.maximum(counts, 1), 0.0).astype(np.float32))
        grads, sums = None, np.zeros(3)
        for mb, tg in zip(micro, targets):
            if tg.size == 0:
                continue
            clip = {}
            if mb.clip_pixels is not None:  # the frozen tower: features are constants of the step
                features = self.vision.tower(mx.array(self.vision.processor.normalize(mb.clip_pixels)))
                mx.eval(features)
                clip = {"features": features, "image_start": mb.image_start}
            (_, s), g = self._value_and_grad(self.params, *self._micro_inputs(mb, tg), weights, **clip)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(grads, s)  # bound the graph (and memory) to one micro-step
            sums += np.array(s, dtype=np.float64)
        if grads is None:
            raise TrainingConfigError(f"step {step}: no labelled token in the batch; check the data")
        grads = world.average_gradients(grads)
        tokens = sum(mb.num_tokens for mb in micro) * world.size
        return grads, world.all_sum(sums), counts, tokens

    def train_step(self, step: int) -> StepRecord:
        cfg = self.cfg
        t0 = time.perf_counter()
        grads, sums, counts, tokens = self.gradients(step)
        if cfg.max_grad_norm is not None:
            grads, norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        else:
            norm = _global_norm(grads)
        grad_norm = float(norm)  # the same value on every rank: the gradients are already reduced
        lr = float(self.schedule(mx.array(step)))
        # Guard: the loss sums are host values already; NaN/Inf anywhere in the gradients shows in
        # their norm. A bad step leaves weights and optimizer state untouched.
        finite = bool(np.isfinite(sums).all()) and math.isfinite(grad_norm)
        if finite:
            self.params = self._canonical(self.optimizer.apply_gradients(grads, self.params))
            self.model.update(self.params if self.compute_dtype == mx.float32 else tree_map(lambda p: p.astype(self.compute_dtype), self.params))
            mx.eval(self.params, self.optimizer.state)
            self.nonfinite_streak = 0
        else:
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
        losses = {t: (float(sums[i] / counts[i]) if counts[i] > 0 else None) for i, t in enumerate(TASKS)}
        coeffs = (cfg.t2i_coeff, cfg.lm_coeff, cfg.mmu_coeff)
        loss = float(sum(c * v for c, v in zip(coeffs, losses.values()) if v is not None))
        dt = time.perf_counter() - t0
        return StepRecord(step + 1, losses, loss, lr, tokens / dt, mx.get_peak_memory() / 1e9, grad_norm, not finite)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to max_steps. Rank 0 holds the run folder's lock throughout and leaves status.json
        saying how the run ended, whatever ends it."""
        if not self.world.is_main:
            return self._loop()
        with runfolder.locked(self.run_dir):
            self._start_run()
            self.world.on_abort(lambda message, status, code: self._write_status(status, message, exit_code=code))
            try:
                result = self._loop()
            except BaseException as e:
                self._record_failure(e)
                raise
            self._write_status("completed", f"trained {result.steps} steps", exit_code=0,
                               output=str(result.output) if result.output else None)
            return result

    def _loop(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(self.start_step)
        sampler = self._sampler() if cfg.val_every and self.world.is_main else None
        bar = self._bar()
        for step in range(self.start_step, cfg.max_steps):
            rec = self.train_step(step)
            self.step = rec.step
            result.history.append(rec)
            result.steps = rec.step
            if self.world.is_main:
                runfolder.append_log(self.run_dir, {**rec.to_dict(), "run_id": self.run_id})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_postfix(rec))
                elif rec.step % cfg.log_every == 0:
                    self.log(f"step {rec.step}: {_postfix(rec)}")
            self._check_divergence(rec)
            if self.world.is_main:
                if rec.step % cfg.save_every == 0 or rec.step == cfg.max_steps:
                    self.save_checkpoint(rec)
                if sampler is not None and rec.step % cfg.val_every == 0:
                    sampler(self.model, rec.step, self.run_dir / "samples")
                if cfg.eval_every and rec.step % cfg.eval_every == 0:
                    self._benchmark(rec.step)
            if self.callback is not None:
                self.callback(rec)
        if bar is not None:
            bar.close()
        if self.world.is_main and result.steps == cfg.max_steps:
            result.output = self.save_final()
        self.world.barrier()
        return result

    def _check_divergence(self, rec: StepRecord) -> None:
        if rec.skipped:
            self.log(f"warning: step {rec.step} skipped: non-finite loss or gradient norm ({rec.grad_norm}); "
                     f"{self.nonfinite_streak} in a row, {self.nonfinite_total} in this run")
        if self.nonfinite_streak >= self.cfg.max_nonfinite_steps:
            last = latest_checkpoint(self.run_dir) if self.world.is_main else None
            raise TrainingDivergedError(
                f"{self.nonfinite_streak} steps in a row (to step {rec.step}) had non-finite losses or gradients; stopped "
                f"without saving, the last good checkpoint is {last.name if last else 'none'} (lower lr, set max_grad_norm, "
                "or check the data, then --resume)"
            )

    # -- the run folder ---------------------------------------------------------------------------
    def _start_run(self) -> None:
        """Rank 0, under the folder lock: claim the folder for a new run (or continue the resumed
        one), and say so in status.json."""
        if self.resume:
            self.run_id = self.run_id or runfolder.new_run_id()  # checkpoints from before run ids
            runfolder.adopt_run(self.run_dir, self.run_id)
        else:
            built = ("init",) if self.cfg.init is not None else ()  # the start model setup built (train/init.py)
            self.run_id = runfolder.start_run(self.run_dir, force=self.force, built=built)
        (self.run_dir / "train_config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2))
        self._write_status("running", f"resumed at step {self.start_step}" if self.resume else "started")

    def _write_status(self, status: str, message: str, exit_code: int | None = None, **extra) -> None:
        last = latest_checkpoint(self.run_dir)
        runfolder.write_status(
            self.run_dir, status, run_id=self.run_id, step=self.step, max_steps=self.cfg.max_steps, message=message,
            exit_code=exit_code, checkpoint=str(last) if last else None, skipped_steps=self.nonfinite_total, **extra,
        )

    def _record_failure(self, e: BaseException) -> None:
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C, or SIGTERM turned into one by the CLI
            status, code, message = "interrupted", getattr(e, "exit_code", 130), str(e) or "interrupted (Ctrl-C)"
        elif isinstance(e, ShowoError):
            status, code, message = "failed", getattr(e, "exit_code", 2), str(e)
        else:
            status, code, message = "failed", 1, f"{type(e).__name__}: {e}"
        try:
            self._write_status(status, " ".join(message.split())[:500], exit_code=code)
        except (OSError, ShowoError):
            pass  # the original error matters more than the status file

    def _benchmark(self, step: int) -> None:
        """`eval_every`: score the model on `eval_data` and append {"step", "eval"} to log.jsonl."""
        if getattr(self, "_evaluator", None) is None:
            from ..eval.during_training import TrainingEvaluator

            self._evaluator = TrainingEvaluator(self.model_folder, self.model, self.cfg.eval_data, limit=self.cfg.eval_limit, log=self.log)
        self._evaluator(step, self.run_dir / "log.jsonl")

    def _bar(self):
        if not (self.cfg.progress and self.world.is_main):
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.max_steps, initial=self.start_step, desc="training", unit="step", dynamic_ncols=True)

    def _sampler(self):
        from .validate import Sampler

        return Sampler(self.model_folder, self.model_config, self.prompting, prompts=self.cfg.val_prompts,
                       steps=self.cfg.val_steps, guidance=self.cfg.val_guidance, seed=self.cfg.val_seed, log=self.log)

    # -- saving and resuming ----------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {
            "base_fingerprint": self.base_fingerprint,
            "model_config": self.showo.to_dict(),
            "fine_tune": self.cfg.fine_tune,
            "trainable_signature": _signature(self.params),
        }

    def save_checkpoint(self, rec: StepRecord | None = None) -> Path:
        step = rec.step if rec else self.start_step
        state = {
            "run_id": self.run_id,
            "skipped_steps": self.nonfinite_total,
            **self._identity(),
            "seed": self.cfg.seed,
            "world_size": self.world.size,
            "data": {t: {"position": step * self.batches.global_batch(t), "global_batch": self.batches.global_batch(t),
                         "dataset": self.data_identity[t]} for t in TASKS},
            "rng": "every draw is seeded by (seed, task, stream position) or (seed, step)",
            "last": rec.to_dict() if rec else None,
            "config": self.cfg.to_dict(),
        }
        return save_checkpoint(self.run_dir, step, self.params, self.optimizer.state, state, keep=self.cfg.keep_checkpoints)

    def _resume(self) -> None:
        found: list = []
        error = self._catch(lambda: found.extend(resolve_resume(self.run_dir)))
        ck, self.run_id = found if found else (None, None)
        # Every rank reads the checkpoint itself (rank 0 wrote it): agree on which one first, so a
        # rank that cannot see it fails everywhere instead of leaving the others waiting.
        steps = self.world.all_gather_ints([int(ck.name.split("-")[1]) if ck else -1])[:, 0]
        if error is not None:
            raise error
        if (steps < 0).any():
            raise DistributedError(f"--resume: rank {int(np.flatnonzero(steps < 0)[0])} found no checkpoint of this run "
                                   f"in {self.run_dir} (see its message)")
        if len(set(steps.tolist())) > 1:
            raise TrainingConfigError(
                f"--resume: the ranks see different checkpoints (steps {steps.tolist()}); copy {self.run_dir} from "
                "rank 0's machine to the same path on every machine (or put output: on a shared folder)"
            )
        self.world.agree(self._catch(lambda: self._load_resume_state(ck)), "resume")

    def _load_resume_state(self, ck: Path) -> None:
        weights, opt_state, state = load_checkpoint(ck)
        check_resume(state, self._identity(), ck)
        expected = dict(tree_flatten(self.params))
        if set(weights) != set(expected) or any(weights[k].shape != v.shape for k, v in expected.items()):
            raise TrainingConfigError(f"cannot resume from {ck}: its parameters do not match this model")
        self.params = tree_unflatten([(k, weights[k].astype(mx.float32)) for k in self._order])
        self.model.update(self.params if self.compute_dtype == mx.float32 else tree_map(lambda p: p.astype(self.compute_dtype), self.params))
        try:
            self.optimizer.state = opt_state
        except ValueError:
            raise TrainingConfigError(f"cannot resume from {ck}: its optimizer state does not fit this run") from None
        self.start_step = self.step = int(state["step"])
        self.nonfinite_total = int(state.get("skipped_steps", 0))
        for key in ("seed", "world_size"):
            if state.get(key) != {"seed": self.cfg.seed, "world_size": self.world.size}[key]:
                self.log(f"warning: {key} changed since the checkpoint ({state.get(key)}); the data order will differ")
        old = state.get("config", {})
        changed = [k for k in ("batch_t2i", "batch_lm", "batch_mmu", "grad_accum", "lr", "warmup_steps", "max_steps") if old.get(k) != getattr(self.cfg, k)]
        if changed:
            self.log(f"warning: {', '.join(changed)} changed since the checkpoint; the run will not match an uninterrupted one")
        mx.eval(self.params, self.optimizer.state)
        if self.world.is_main:
            # Lines of steps after the checkpoint are about to be redone; a partial last line (power
            # loss mid-write) is dropped instead of failing the resume.
            unreadable = runfolder.trim_log(self.run_dir, self.start_step)
            if unreadable:
                self.log(f"warning: dropped {unreadable} unreadable line(s) of {self.run_dir / runfolder.LOG_FILE} "
                         "(an interrupted write)")
        self.log(f"resumed run {self.run_id or '(no run id)'} from {ck} at step {self.start_step}")

    def save_final(self) -> Path:
        from .. import __version__
        from .export import write_model_folder
        from .lora import adapter_config, save_adapters

        cfg = self.cfg
        bad = first_non_finite(dict(tree_flatten(self.params)))
        if bad is not None:
            raise TrainingDivergedError(f"{bad} holds NaN or Inf values; the result was not written, the last good "
                                        "checkpoint is kept")
        if cfg.fine_tune == "lora":
            config = adapter_config(
                rank=cfg.lora_rank, scale=cfg.lora_scale, dropout=cfg.lora_dropout, keys=self.lora_keys, num_layers=cfg.lora_layers,
                base={"model": str(self.model_folder), "fingerprint": self.base_fingerprint, "quantize_at_load": self.quantize_at_load},
            )
            self.model.update(self.params)  # adapters are saved in float32
            out = save_adapters(self.run_dir / "adapters", self.model, config)
            self.log(f"adapters written to {out}")
            return out
        weights = {**self.frozen_master, **dict(tree_flatten(self.params))}
        note = {"from": str(self.model_folder), "steps": cfg.max_steps, "showo_mlx_version": __version__}
        out = write_model_folder(self.model_folder, self.model_config, weights, self.run_dir / "model", quantization=None, note=note, force=True)
        self.log(f"model written to {out}")
        return out


def _global_norm(grads) -> mx.array:
    """The L2 norm over every gradient (what clip_grad_norm computes), kept lazy."""
    return mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grads)))


def _postfix(rec: StepRecord) -> str:
    parts = [f"{t} {v:.3f}" for t, v in rec.losses.items() if v is not None]
    return ", ".join(parts) + f" | {rec.tokens_per_s:,.0f} tok/s | peak {rec.peak_memory_gb:.2f} GB"


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False, log: Callable[[str], None] = print) -> TrainResult:
    return Trainer(cfg, resume=resume, force=force, log=log).run()
