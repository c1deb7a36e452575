"""Shared test fixtures: the reference fixture folder and a converted tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
REF = TESTS / "fixtures" / "reference"
CLIP_REF = TESTS / "fixtures" / "reference-clip"
sys.path.insert(0, str(TESTS))  # test helpers such as torch_format.py


def load_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(REF / f"{name}.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="session")
def ref() -> Path:
    return REF


@pytest.fixture(scope="session")
def cases() -> dict:
    return json.loads((REF / "cases.json").read_text())


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Path:
    """The fixture checkpoint converted once (float32) with its MAGVIT and tokenizer."""
    from showo_mlx.convert import convert

    dst = tmp_path_factory.mktemp("models") / "tiny"
    convert(REF / "showo", dst, vq=REF / "magvitv2", tokenizer=REF / "tokenizer", log=lambda m: None)
    return dst


@pytest.fixture(scope="session")
def pipe(converted):
    from showo_mlx.pipeline import Pipeline

    return Pipeline(converted)


@pytest.fixture(scope="session")
def fx_model(pipe):
    return pipe.model


@pytest.fixture(scope="session")
def prompting(pipe):
    return pipe.prompting


@pytest.fixture(scope="session")
def clip_converted(tmp_path_factory) -> Path:
    """The CLIP-ViT fixture converted once (float32, understanding-only: it carries no MAGVIT)."""
    from showo_mlx.convert import convert

    dst = tmp_path_factory.mktemp("models") / "tiny-clip"
    convert(CLIP_REF / "showo", dst, vision_tower=CLIP_REF / "clip", tokenizer=CLIP_REF / "tokenizer", no_vq=True,
            log=lambda m: None)
    return dst


@pytest.fixture
def restore_limits():
    """Low-RAM mode changes process-wide MLX limits; put them back for the other tests."""
    memory_limit = mx.get_memory_limit()
    cache_limit = mx.set_cache_limit(memory_limit)
    mx.set_cache_limit(cache_limit)
    yield
    mx.set_memory_limit(memory_limit)
    mx.set_cache_limit(cache_limit)
