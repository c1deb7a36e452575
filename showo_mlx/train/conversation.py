"""LLaVA conversations as Show-o's MAGVIT-path mmu text (official
`llava/llava_data_vq_unified.py`, `preprocess_v0`).

The phi1.5 template (system "", roles USER/ASSISTANT, sep " ", sep2 "<|endoftext|>") renders

    "USER: q1 ASSISTANT: a1<|endoftext|>USER: q2 ASSISTANT: a2<|endoftext|>"

(after ``strip()``; ``<image>`` markers are removed from every turn). Targets mirror the
reference's `preprocess_v0`: per round, the instruction "USER: q ASSISTANT:" is ignored
(``len(tok(instruction + " ASSISTANT: ")) - 1`` tokens, the -1 dropping the lone trailing space
token), the answer and its <|endoftext|> are trained on, everything after the last round is ignored,
and a token-count mismatch blanks the whole sample. Then ids are right-padded with [PAD] / labels
with -100 to the text length, or truncated to it.
"""

from __future__ import annotations

import numpy as np

from .losses import IGNORE_ID

ROLES = {"human": "USER", "gpt": "ASSISTANT"}
SEP, SEP2 = " ", "<|endoftext|>"
ANSWER_SEP = SEP + "ASSISTANT" + ": "
MODEL_MAX_LENGTH = 2048  # the phi-1_5 tokenizer's truncation length
IMAGE_MARKER = "<image>"


def render(conversations: list[dict]) -> str | None:
    """The conversation string, or None when the turns do not alternate human/gpt."""
    turns = list(conversations)
    if turns and ROLES.get(turns[0].get("from")) != "USER":
        turns = turns[1:]  # the reference skips a leading non-human turn
    text = SEP  # system "" + sep
    for j, turn in enumerate(turns):
        role = ROLES.get(turn.get("from"))
        if role != ("USER", "ASSISTANT")[j % 2]:
            return None
        value = str(turn.get("value", "")).strip().replace(IMAGE_MARKER, "").strip()
        text += f"{role}: {value}" + (SEP, SEP2)[j % 2] if value else f"{role}:"
    return text.strip()


def conversation_tokens(encode, conversations: list[dict], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) of one conversation, both (length,) int64. `encode` = text → ids without
    special tokens added (Prompting.encode). Bad conversations give all-ignored labels."""
    text = render(conversations)
    if text is None:
        ids: list[int] = []
        labels: list[int] = []
    else:
        ids = encode(text)[:MODEL_MAX_LENGTH]
        labels = list(ids)
        cur = 0
        for rnd in text.split(SEP2):
            if rnd == "":
                break
            parts = rnd.split(ANSWER_SEP)
            if len(parts) != 2:
                break
            round_len = len(encode(rnd)) + 1  # + the <|endoftext|> that ended the round
            instruction_len = len(encode(parts[0] + ANSWER_SEP)) - 1
            labels[cur : cur + instruction_len] = [IGNORE_ID] * len(labels[cur : cur + instruction_len])
            cur += round_len
        labels[cur:] = [IGNORE_ID] * len(labels[cur:])
        if cur < MODEL_MAX_LENGTH and cur != len(ids):  # tokenization mismatch: blank the sample
            labels = [IGNORE_ID] * len(labels)
    ids = (ids + [pad_id] * length)[:length]
    labels = (labels + [IGNORE_ID] * length)[:length]
    return np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
