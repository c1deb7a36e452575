"""Prompt builders against the official UniversalPrompting outputs (`training/prompting_utils.py`)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REF, load_npz
from showo_mlx.config import ShowoConfig
from showo_mlx.errors import ShowoConfigError
from showo_mlx.layout import batch_allowed
from showo_mlx.prompting import Prompting, clean_up_spaces

P = load_npz("prompting")


@pytest.fixture(scope="module")
def texts(cases):
    return [p["text"] for p in cases["prompts"]]


def test_special_ids_are_derived_from_the_tokenizer(prompting, cases):
    ids, want = prompting.ids, cases["ids"]
    special = want["special_token_ids"]
    assert (ids.bos, ids.pad, ids.soi, ids.eoi) == (want["bos_token_id"], want["pad_token_id"], special["<|soi|>"], special["<|eoi|>"])
    assert (ids.t2i, ids.mmu) == (special["<|t2i|>"], special["<|mmu|>"])
    assert ids.image_offset == want["image_token_offset"] == len(prompting.tokenizer)
    assert ids.mask == want["mask_token_id"]


def test_base_tokenisation_matches_reference(prompting, cases):
    for p in cases["prompts"]:
        assert prompting.encode(p["text"]) == p["base_token_ids"], p["note"]


def test_t2i_gen_ids_and_cfg_masks(prompting, texts):
    n = P["t2i_gen.input_ids"].shape[1] - prompting.max_text_len - 2
    image = np.full((len(texts), n), prompting.ids.mask)
    cond = prompting.t2i_gen(texts, image)
    uncond = prompting.uncond(image)
    np.testing.assert_array_equal(cond.ids, P["t2i_gen.input_ids"])
    np.testing.assert_array_equal(uncond.ids, P["t2i_gen.uncond_input_ids"])
    allowed = batch_allowed(cond.layouts + uncond.layouts)
    np.testing.assert_array_equal(allowed, P["t2i_gen.cond_uncond_allowed"])
    # prompts 5 (127 tokens) and 6 (420 tokens) are truncated; 4 (126 tokens) just fits
    assert cond.truncated == [False, False, False, False, False, True, True, False]
    assert cond.ids[5, prompting.max_text_len - 1] == prompting.ids.eos


def test_mmu_inference_prompts(prompting, texts):
    image = P["mmu.image_tokens"]
    for i, q in enumerate(texts):
        prompt = prompting.mmu_gen(image, q)
        np.testing.assert_array_equal(prompt.ids, P[f"mmu.input_ids.{i}"])
        np.testing.assert_array_equal(batch_allowed(prompt.layouts), P[f"mmu.allowed.{i}"])


def test_lm_training_rows(prompting, texts):
    prompt = prompting.lm(texts, P["lm.input_ids"].shape[1])
    np.testing.assert_array_equal(prompt.ids, P["lm.input_ids"])
    np.testing.assert_array_equal(prompt.labels, P["lm.labels"])
    np.testing.assert_array_equal(batch_allowed(prompt.layouts), P["lm.allowed"])


def test_mmu_training_rows(prompting, texts):
    image = np.repeat(P["mmu.image_tokens"], len(texts), axis=0)
    prompt = prompting.mmu(image, texts)
    np.testing.assert_array_equal(prompt.ids, P["mmu_train.input_ids"])
    np.testing.assert_array_equal(prompt.labels, P["mmu_train.labels"])
    np.testing.assert_array_equal(batch_allowed(prompt.layouts), P["mmu_train.allowed"])


def test_t2i_training_rows(prompting, texts):
    prompt = prompting.t2i(texts, P["t2i_train.image_input"], P["t2i_train.image_labels"], cond_dropout_prob=0.0)
    np.testing.assert_array_equal(prompt.ids, P["t2i_train.input_ids"])
    np.testing.assert_array_equal(prompt.labels, P["t2i_train.labels"])


def test_condition_dropout_gives_the_unconditional_prompt(prompting, texts):
    image = P["t2i_train.image_input"]
    dropped = prompting.t2i(texts, image, P["t2i_train.image_labels"], cond_dropout_prob=1.0)
    uncond = prompting.uncond(image)
    np.testing.assert_array_equal(dropped.ids, uncond.ids)


def test_decode_applies_reference_cleanup(prompting, cases):
    for run in cases["mmu_generate"]:
        assert prompting.decode(run["generated"]) == run["decoded_text"][0]
    assert clean_up_spaces("Hello , world . Is it ? I do n't know") == "Hello, world. Is it? I don't know"


def test_tokenizer_mismatch_is_refused():
    cfg = ShowoConfig(vocab_size=600, llm_vocab_size=525, codebook_size=64, num_vq_tokens=64, mask_token_id=599)
    with pytest.raises(ShowoConfigError, match="llm_vocab_size"):
        Prompting(REF / "tokenizer", cfg)
