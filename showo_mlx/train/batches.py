"""One mixed training batch ``[t2i rows | lm rows | mmu rows]``, as the official
`training/train.py` concatenates them.

All rows share the t2i length ``L = (max_seq_length + 1) + 1 + N + 1`` so that one forward with one
concatenated mask serves the three tasks.

Which samples a (step, rank, micro-step) gets: every task has an endless shuffled stream; optimizer
step s consumes positions ``[s·G, (s+1)·G)`` with ``G = batch · grad_accum · world``, and rank r's
micro-step a takes the slice starting at ``s·G + (r·grad_accum + a)·batch``. A one-process run with
batch 2b therefore sees exactly the rows of a two-process run with batch b.

Every random choice of a row (mask ratio and positions, condition dropout, question, text window)
comes from a generator seeded by (seed, task, stream position, purpose): independent of how rows are
split over processes and micro-steps, and reproducible after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import TrainingConfigError
from ..layout import Layout, mmu_layout, mmu_vit_layout
from ..prompting import Prompting
from .conversation import conversation_tokens
from .data import PreparedData, StreamSampler, TextData
from .losses import IGNORE_ID, TaskRows
from .masking import mask_image_tokens

TASK_IDS = {"t2i": 0, "lm": 1, "mmu": 2}
# Purposes of the per-row generators.
_MASK, _DROP, _QUESTION, _WINDOW = 0, 1, 2, 3
# The pre-training captioning layout (official `training/data.py`, fed to
# `UniversalPrompting.mmu_prompt`): "USER: \n" + question + " ASSISTANT:" + " " + caption.
CAPTION_TEMPLATE = "USER: \n{question} ASSISTANT: {caption}"
# The CLIP path's pre-training rows use LLaVA's `plain` template: caption + "\n", then eos
# (llava/llava_pretrain_data.py, preprocess_plain); nothing is masked out of the labels.
PLAIN_SEP = "\n"


@dataclass
class MicroBatch:
    ids: np.ndarray  # (B, L) int64
    labels: np.ndarray  # (B, L) int64
    layouts: list[Layout]
    rows: TaskRows
    # CLIP path (w_clip_vit models): the mmu rows' CLIP crops (B_mmu, H, W, 3) uint8, whose projected
    # features replace the placeholder positions [image_start, image_start + n) of those rows.
    clip_pixels: np.ndarray | None = None
    image_start: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.ids.size)


class BatchBuilder:
    def __init__(
        self,
        prompting: Prompting,
        *,
        rows: TaskRows,
        t2i_data: PreparedData | None = None,
        mmu_data: PreparedData | None = None,
        lm_data: TextData | None = None,
        seed: int = 0,
        cond_dropout_prob: float = 0.1,
        min_masking_rate: float = 0.0,
        mmu_questions: list[str] | None = None,
        lm_max_chars: int = 8000,
        grad_accum: int = 1,
        world: int = 1,
        clip_image_tokens: int | None = None,
    ):
        self.p = prompting
        self.clip_image_tokens = clip_image_tokens  # set for w_clip_vit models: mmu rows go through CLIP
        self.rows = rows
        self.data = {"t2i": t2i_data, "mmu": mmu_data, "lm": lm_data}
        self.seed = seed
        self.cond_dropout_prob = cond_dropout_prob
        self.min_masking_rate = min_masking_rate
        self.questions = list(mmu_questions or [])
        self.lm_max_chars = lm_max_chars
        self.grad_accum, self.world = grad_accum, world
        cfg = prompting.config
        self.length = prompting.max_text_len + cfg.num_vq_tokens + 2
        self.samplers = {
            task: StreamSampler(len(d), seed, TASK_IDS[task]) for task, d in self.data.items() if d is not None
        }

    # -- positions and randomness ----------------------------------------------------------------
    def global_batch(self, task: str) -> int:
        return getattr(self.rows, task) * self.grad_accum * self.world

    def positions(self, task: str, step: int, rank: int = 0, micro: int = 0) -> np.ndarray:
        b = getattr(self.rows, task)
        start = step * self.global_batch(task) + (rank * self.grad_accum + micro) * b
        return np.arange(start, start + b, dtype=np.int64)

    def _rng(self, task: str, position: int, purpose: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, TASK_IDS[task], int(position), purpose])

    # -- rows -------------------------------------------------------------------------------------
    def build(self, step: int, rank: int = 0, micro: int = 0) -> MicroBatch:
        parts, clip = [], ()
        for task, make in (("t2i", self._t2i), ("lm", self._lm), ("mmu", self._mmu)):
            if getattr(self.rows, task):
                part = make(self.positions(task, step, rank, micro))
                parts.append(part[:3])
                clip = part[3:]  # (pixels, image_start) from CLIP mmu rows
        ids = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        layouts = [lay for p in parts for lay in p[2]]
        return MicroBatch(ids, labels, layouts, self.rows, *clip)

    def _t2i(self, positions: np.ndarray):
        data = self.data["t2i"]
        idx = self.samplers["t2i"].index(positions)
        captions, inputs, labels = [], [], []
        for pos, i in zip(positions, idx):
            image_ids = self.p.image_ids(data.codes(int(i)))[None]
            x, y, _ = mask_image_tokens(image_ids, self.p.ids.mask, self._rng("t2i", pos, _MASK), self.min_masking_rate)
            inputs.append(x[0])
            labels.append(y[0])
            caption = data.meta(int(i)).get("caption", "")
            # Condition dropout → the empty prompt, i.e. [t2i, bos, eos] left-padded (`UniversalPrompting.t2i_prompt`).
            if self.cond_dropout_prob > 0 and self._rng("t2i", pos, _DROP).random() < self.cond_dropout_prob:
                caption = ""
            captions.append(caption)
        prompt = self.p.t2i(captions, np.stack(inputs), np.stack(labels), cond_dropout_prob=0.0)
        return prompt.ids, prompt.labels, prompt.layouts

    def _lm(self, positions: np.ndarray):
        data = self.data["lm"]
        texts = []
        for pos, i in zip(positions, self.samplers["lm"].index(positions)):
            text = data.text(int(i))
            if len(text) > self.lm_max_chars:  # a random window, as the RefinedWeb loader takes
                start = int(self._rng("lm", pos, _WINDOW).integers(0, len(text) - self.lm_max_chars + 1))
                text = text[start : start + self.lm_max_chars]
            texts.append(text)
        prompt = self.p.lm(texts, self.length)
        return prompt.ids, prompt.labels, prompt.layouts

    def _mmu(self, positions: np.ndarray):
        if self.clip_image_tokens:
            return self._mmu_vit(positions)
        data = self.data["mmu"]
        idx = self.samplers["mmu"].index(positions)
        image_ids = np.stack([self.p.image_ids(data.codes(int(i))) for i in idx])
        if data.kind == "conversations":
            return self._mmu_conversations(image_ids, [data.meta(int(i))["conversations"] for i in idx])
        texts = []
        for pos, i in zip(positions, idx):
            caption = data.meta(int(i)).get("caption", "")
            if self.questions:
                q = self.questions[int(self._rng("mmu", pos, _QUESTION).integers(len(self.questions)))]
                caption = CAPTION_TEMPLATE.format(question=q, caption=caption)
            texts.append(caption)
        prompt = self.p.mmu(image_ids, texts)
        return prompt.ids, prompt.labels, prompt.layouts

    def _mmu_conversations(self, image_ids: np.ndarray, conversations: list[list[dict]]):
        """LLaVA rows (`llava/llava_data_vq_unified.py` as `training/train.py` uses them): [mmu, soi]
        image [eoi] conversation(max_seq_length)."""
        n_text = self.p.max_text_len - 1
        ids_, labels_ = [], []
        b, n = image_ids.shape
        for img, conv in zip(image_ids, conversations):
            text, text_labels = conversation_tokens(self.p.encode, conv, n_text, self.p.ids.pad)
            head = np.array([self.p.ids.mmu, self.p.ids.soi])
            ids_.append(np.concatenate([head, img, [self.p.ids.eoi], text]))
            labels_.append(np.concatenate([np.full(n + 3, IGNORE_ID), text_labels]))
        ids = np.stack(ids_).astype(np.int64)
        layouts = [mmu_layout(ids.shape[1], eoi=n + 2) for _ in range(b)]
        return ids, np.stack(labels_).astype(np.int64), layouts

    def _mmu_vit(self, positions: np.ndarray):
        """CLIP-path rows (`training/train_w_clip_vit.py`): conversations as LLaVA tuning
        ``[mmu] + system(28) + [soi] + image + [eoi] + conversation`` (mask with system_prompt_len 28),
        captions as LLaVA pre-training ``[mmu, soi] + image + [eoi] + caption "\n" eos`` (system_prompt_len
        0). The image positions hold [PAD] here; the trainer puts the projected CLIP features there.
        The text fills the row to the common length L (the reference's ``max_seq_length − (576 − N)``
        minus the system prompt), right-padded or cut."""
        data = self.data["mmu"]
        idx = self.samplers["mmu"].index(positions)
        n_img, pad = self.clip_image_tokens, self.p.ids.pad
        conversations = data.kind == "conversations"
        system = self.p.system_prompt_ids() if conversations else []
        head = [self.p.ids.mmu, *system, self.p.ids.soi]
        n_text = self.length - (len(head) + n_img + 1)
        if n_text < 1:
            need = len(head) + n_img - self.p.config.num_vq_tokens - 1  # from L = max_seq_length + N + 3
            raise TrainingConfigError(
                f"CLIP mmu rows do not fit: max_seq_length must be at least {need} for {n_img} image features "
                "(the official CLIP tuning uses 576); set max_seq_length"
            )
        ids_, labels_ = [], []
        for i in idx:
            meta = data.meta(int(i))
            if conversations:
                text, text_labels = conversation_tokens(self.p.encode, meta["conversations"], n_text, pad)
            else:
                tokens = (self.p.encode(meta.get("caption", "") + PLAIN_SEP) + [self.p.ids.eos])[:n_text]
                text = np.asarray(tokens + [pad] * (n_text - len(tokens)), dtype=np.int64)
                text_labels = np.asarray(tokens + [IGNORE_ID] * (n_text - len(tokens)), dtype=np.int64)
            ids_.append(np.concatenate([head, np.full(n_img, pad), [self.p.ids.eoi], text]))
            labels_.append(np.concatenate([np.full(len(head) + n_img + 1, IGNORE_ID), text_labels]))
        ids = np.stack(ids_).astype(np.int64)
        layouts = [mmu_vit_layout(ids.shape[1], len(system), n_img) for _ in idx]
        pixels = np.stack([data.clip_pixels(int(i)) for i in idx])
        return ids, np.stack(labels_).astype(np.int64), layouts, pixels, len(head)
