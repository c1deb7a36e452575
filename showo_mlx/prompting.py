"""Text tokenizer and the reference's sequence builders (official `training/prompting_utils.py`,
`UniversalPrompting`, and the question formats of `inference_mmu.py`).

Every special id is derived from the tokenizer and the model config, never hard-coded: the test
fixture's tokenizer has a 499-token vocabulary, so 50256/50295/50305 would be wrong there.
Each builder returns numpy int64 ids (and labels for training builders) plus one `Layout` per row.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import ShowoConfig
from .errors import ShowoConfigError
from .layout import Layout, layout_from_ids, mmu_layout, mmu_vit_layout
from .limits import check_text

IGNORE_ID = -100
# The nine tokens UniversalPrompting adds after [PAD], in the reference order (`UniversalPrompting.__init__`).
TASK_TOKENS = ("<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>")
PAD_TOKEN = "[PAD]"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)
MMU_QUESTION_TEMPLATE = "USER: \n{question} ASSISTANT:"
# phi-1_5's tokenizer.json is 2.1 MB and the other files smaller: anything far bigger is not a tokenizer
# (e.g. a link to /dev/zero), and a FIFO would block the read forever.
MAX_TOKENIZER_FILE_BYTES = 64 * 2**20
# inference_mmu.py (w_clip_vit branch): the system prompt, 28 phi-1.5 tokens.
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# transformers 4.41 `clean_up_tokenization` (applied by the reference because phi-1_5 sets
# clean_up_tokenization_spaces=true); newer transformers skip it for BPE, so we apply it ourselves.
_CLEANUP_RULES = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


def clean_up_spaces(text: str) -> str:
    for old, new in _CLEANUP_RULES:
        text = text.replace(old, new)
    return text


def _load_hf_tokenizer(folder: Path):
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # quiet "PyTorch was not found"
    from transformers import AutoTokenizer

    logging.getLogger("transformers").setLevel(logging.ERROR)
    if not (folder / "tokenizer.json").exists() and not (folder / "vocab.json").exists():
        raise ShowoConfigError(
            f"no tokenizer files in {folder}; re-run `showo convert` (it copies phi-1_5's tokenizer)"
        )
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.exists() and (not path.is_file() or path.stat().st_size > MAX_TOKENIZER_FILE_BYTES):
            raise ShowoConfigError(
                f"{path} is not a regular tokenizer file (a special file, or over {MAX_TOKENIZER_FILE_BYTES >> 20} MB); "
                "re-run `showo convert` to restore the tokenizer"
            )
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # tokenizers raises bare Exception for a malformed tokenizer.json
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise ShowoConfigError(
            f"the tokenizer in {folder} is corrupt ({type(e).__name__}: {reason}); re-run `showo convert` to restore it"
        ) from None


@dataclass(frozen=True)
class SpecialIds:
    bos: int  # = eos = <|sot|> = <|eot|> (`UniversalPrompting.__init__`'s sptids_dict)
    pad: int
    soi: int
    eoi: int
    t2i: int
    mmu: int
    image_offset: int
    mask: int

    @property
    def eos(self) -> int:
        return self.bos


@dataclass
class Prompt:
    """Token ids (B, L) with one Layout per row; labels for training builders."""

    ids: np.ndarray
    layouts: list[Layout]
    labels: np.ndarray | None = None
    truncated: list[bool] | None = None


@dataclass
class VitPrompt:
    """A CLIP-path prompt: token ids without image placeholders, the position where the image
    embeddings go, and the Layout of the spliced sequence."""

    ids: np.ndarray  # (1, L_ids) int64
    image_start: int
    num_image: int
    layout: Layout

    @property
    def length(self) -> int:
        return self.ids.shape[1] + self.num_image

    def splice(self, text_embeddings, image_embeddings):
        """cat(text[:, :start], image, text[:, start:]) along the sequence axis (mx or np arrays)."""
        import mlx.core as mx

        s = self.image_start
        return mx.concatenate([text_embeddings[:, :s], image_embeddings.astype(text_embeddings.dtype),
                               text_embeddings[:, s:]], axis=1)


class Prompting:
    """The tokenizer as UniversalPrompting mutates it, plus the sequence builders."""

    def __init__(self, tokenizer_dir: str | Path, config: ShowoConfig):
        tok = _load_hf_tokenizer(Path(tokenizer_dir))
        if len(tok) != config.llm_vocab_size:
            raise ShowoConfigError(
                f"tokenizer in {tokenizer_dir} has {len(tok)} tokens but the model expects "
                f"llm_vocab_size={config.llm_vocab_size}; use the tokenizer that came with the model"
            )
        tok.add_special_tokens({"pad_token": PAD_TOKEN})
        tok.add_tokens(list(TASK_TOKENS))
        if len(tok) != config.image_token_offset:
            raise ShowoConfigError(
                f"tokenizer has {len(tok)} tokens after adding Show-o's 10, expected "
                f"{config.image_token_offset}; the tokenizer already contains Show-o tokens"
            )
        self.tokenizer = tok
        self.config = config
        self.max_text_len = config.max_seq_length + 1  # "+1 for the task token" (`UniversalPrompting.__init__`)
        get = tok.convert_tokens_to_ids
        self.ids = SpecialIds(
            bos=tok.bos_token_id,
            pad=tok.pad_token_id,
            soi=get("<|soi|>"),
            eoi=get("<|eoi|>"),
            t2i=get("<|t2i|>"),
            mmu=get("<|mmu|>"),
            image_offset=config.image_token_offset,
            mask=config.mask_token_id,
        )

    # -- text ------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Tokens of `text` with no special tokens added (the reference's `tokenizer(text)`)."""
        check_text(text, "text")  # a lone surrogate would reach the Rust tokenizer as a TypeError
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """Reference decoding: skip special tokens, GPT-2 space clean-up. Image/[MASK] ids, which
        the text tokenizer does not know, are dropped (as the fast tokenizer does)."""
        known = [int(i) for i in ids if 0 <= int(i) < len(self.tokenizer)]
        text = self.tokenizer.decode(known, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return clean_up_spaces(text)

    def _with_bos(self, tokens: list[int]) -> list[int]:
        # as every UniversalPrompting builder does: no second bos when the tokenised text starts with one
        return tokens if tokens[:1] == [self.ids.bos] else [self.ids.bos] + tokens

    def t2i_text_block(self, prompt: str) -> tuple[list[int], bool]:
        """The 129-token left-padded text block of `UniversalPrompting.t2i_gen_prompt`; returns
        (block, was_truncated)."""
        text = [self.ids.t2i] + self._with_bos(self.encode(prompt)) + [self.ids.eos]
        n = self.max_text_len
        if len(text) <= n:
            return [self.ids.pad] * (n - len(text)) + text, False
        return text[: n - 1] + [self.ids.eos], True

    # -- generation prompts --------------------------------------------------------------------
    def _rows(self, texts: Sequence[list[int]], image_tokens: np.ndarray) -> np.ndarray:
        image_tokens = np.asarray(image_tokens, dtype=np.int64)
        if image_tokens.ndim != 2 or image_tokens.shape[0] != len(texts):
            raise ValueError(f"image tokens must be (B={len(texts)}, N), got {image_tokens.shape}")
        b = len(texts)
        soi = np.full((b, 1), self.ids.soi)
        eoi = np.full((b, 1), self.ids.eoi)
        return np.concatenate([np.asarray(texts, dtype=np.int64), soi, image_tokens, eoi], axis=1)

    def t2i_layouts(self, ids: np.ndarray) -> list[Layout]:
        return [layout_from_ids(r, "t2i", pad_id=self.ids.pad, soi_id=self.ids.soi, eoi_id=self.ids.eoi) for r in ids]

    def t2i_gen(self, prompts: Sequence[str], image_tokens: np.ndarray) -> Prompt:
        """`UniversalPrompting.t2i_gen_prompt`: text block(129) + soi + image ids (known: offset+code,
        unknown: [MASK]) + eoi."""
        blocks = [self.t2i_text_block(p) for p in prompts]
        ids = self._rows([b for b, _ in blocks], image_tokens)
        return Prompt(ids, self.t2i_layouts(ids), truncated=[t for _, t in blocks])

    def uncond(self, image_tokens: np.ndarray) -> Prompt:
        """The CFG row: the empty prompt sharing the image tokens (as `inference_t2i.py` builds it)."""
        return self.t2i_gen([""] * len(image_tokens), image_tokens)

    def mmu_length(self, question: str, num_image_tokens: int) -> int:
        """Length of the `mmu_gen` prompt for `question`, to check it fits before encoding an image."""
        return 4 + num_image_tokens + len(self.encode(MMU_QUESTION_TEMPLATE.format(question=question)))

    def mmu_gen(self, image_tokens: np.ndarray, question: str) -> Prompt:
        """`inference_mmu.py`, MAGVIT path: <|mmu|><|soi|> img <|eoi|><|sot|> tok("USER: \\n{q} ASSISTANT:")."""
        image_tokens = np.asarray(image_tokens, dtype=np.int64).reshape(1, -1)
        q = self.encode(MMU_QUESTION_TEMPLATE.format(question=question))
        head = np.array([[self.ids.mmu, self.ids.soi]])
        tail = np.array([[self.ids.eoi, self.ids.bos] + q])
        ids = np.concatenate([head, image_tokens, tail], axis=1)
        return Prompt(ids, [mmu_layout(ids.shape[1], eoi=image_tokens.shape[1] + 2)])

    def vit_question(self, question: str) -> list[int]:
        """Tokens of the phi1.5 conversation template (`llava/llava/conversation.py`) rendered for one
        user turn and an empty assistant turn, stripped: "USER: {q} ASSISTANT:" (no bos, no newline)."""
        user = f"USER: {question} " if question else "USER:"  # the template skips an empty message
        return self.encode((" " + user + "ASSISTANT:").strip())

    def system_prompt_ids(self) -> list[int]:
        return self.encode(SYSTEM_PROMPT)

    def mmu_vit_gen(self, question: str, num_image: int) -> "VitPrompt":
        """The CLIP path's prompt (`inference_mmu.py`, w_clip_vit): ids
        ``[<|mmu|>] + system + [<|soi|>] + [<|eoi|>] + question`` and `num_image` CLIP embeddings
        spliced in after the soi. Layout: every query sees the image columns (system rows included,
        so the system prompt's keys depend on the image: it cannot be prefix-cached on its own)."""
        system = self.system_prompt_ids()
        ids = [self.ids.mmu, *system, self.ids.soi, self.ids.eoi, *self.vit_question(question)]
        start = 2 + len(system)
        length = len(ids) + num_image
        return VitPrompt(np.asarray([ids], dtype=np.int64), start, num_image,
                         mmu_vit_layout(length, system_prompt_len=len(system), num_image=num_image))

    # -- training prompts ----------------------------------------------------------------------
    def t2i(
        self,
        prompts: Sequence[str],
        image_input: np.ndarray,
        image_labels: np.ndarray,
        cond_dropout_prob: float = 0.0,
        rng: np.random.Generator | None = None,
    ) -> Prompt:
        """`UniversalPrompting.t2i_prompt`: as t2i_gen with masked image input and labels; condition
        dropout → empty prompt."""
        rng = rng or np.random.default_rng()
        texts = []
        for p in prompts:
            if cond_dropout_prob > 0 and rng.random() < cond_dropout_prob:
                p = ""
            texts.append(self.t2i_text_block(p)[0])
        ids = self._rows(texts, image_input)
        text = np.asarray(texts, dtype=np.int64)
        text_labels = np.where(text == self.ids.pad, IGNORE_ID, text)
        labels = self._rows(list(text_labels), image_labels)
        return Prompt(ids, self.t2i_layouts(ids), labels=labels)

    def _right_padded(self, tokens: list[int], length: int, eos_on_truncate: bool) -> list[int]:
        if len(tokens) <= length:
            return tokens + [self.ids.pad] * (length - len(tokens))
        return tokens[: length - 1] + [self.ids.eos] if eos_on_truncate else tokens[:length]

    def mmu(self, image_tokens: np.ndarray, texts: Sequence[str]) -> Prompt:
        """`UniversalPrompting.mmu_prompt` (captioning layout): [mmu, soi] image [eoi] text(128,
        right-padded); labels on text."""
        image_tokens = np.asarray(image_tokens, dtype=np.int64)
        n_text = self.max_text_len - 1
        rows = [
            self._right_padded(self._with_bos(self.encode(t)) + [self.ids.eos], n_text, True) for t in texts
        ]
        text = np.asarray(rows, dtype=np.int64)
        b = len(texts)
        head = np.tile([self.ids.mmu, self.ids.soi], (b, 1))
        ids = np.concatenate([head, image_tokens, np.full((b, 1), self.ids.eoi), text], axis=1)
        labels = np.full_like(ids, IGNORE_ID)
        labels[:, -n_text:] = np.where(text == self.ids.pad, IGNORE_ID, text)
        eoi = image_tokens.shape[1] + 2
        return Prompt(ids, [mmu_layout(ids.shape[1], eoi) for _ in range(b)], labels=labels)

    def lm(self, texts: Sequence[str], length: int) -> Prompt:
        """`UniversalPrompting.lm_prompt`: [bos] tokens [eos] right-padded to `length`; truncated without a final eos."""
        rows = [self._right_padded(self._with_bos(self.encode(t)) + [self.ids.eos], length, False) for t in texts]
        ids = np.asarray(rows, dtype=np.int64)
        labels = np.where(ids == self.ids.pad, IGNORE_ID, ids)
        layouts = [layout_from_ids(r, "lm", pad_id=self.ids.pad, soi_id=self.ids.soi, eoi_id=self.ids.eoi) for r in ids]
        return Prompt(ids, layouts, labels=labels)

    def image_ids(self, codes: np.ndarray) -> np.ndarray:
        """MAGVIT codes → LLM token ids."""
        return np.asarray(codes, dtype=np.int64) + self.ids.image_offset
