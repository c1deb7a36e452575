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


@pytest.fixture(scope="session")
def live_server(converted, tmp_path_factory):
    """`showo serve` on the converted fixture model: a subprocess on a free 127.0.0.1 port with an
    API key, a queue of 3, a 1 MB body limit and a 70,000-pixel image limit; stopped at the end."""
    from server_harness import API_KEY, LiveServer

    out = tmp_path_factory.mktemp("served")
    server = LiveServer(converted, "--api-key", API_KEY, "--max-queue", "3", "--max-body-mb", "1",
                        "--max-image-pixels", "70000", "--output-dir", str(out))
    server.output_dir = out
    yield server
    assert server.stop() == 130, "\n".join(server.lines[-10:])  # Ctrl-C: a clean stop, the CLI's exit code
    assert server.lines[-1] == "stopped"


@pytest.fixture(scope="session")
def served_cli_images(converted, tmp_path_factory):
    """`showo generate "a red cat" --steps 2 -g 1.5 -s 3 -n 2`: the PNGs the server tests compare with."""
    from typer.testing import CliRunner

    from showo_mlx.cli import app

    out = tmp_path_factory.mktemp("cli")
    result = CliRunner().invoke(app, ["generate", "a red cat", "--steps", "2", "-g", "1.5", "-s", "3", "-n", "2",
                                      "-o", str(out / "cat_{seed}.png"), "--model", str(converted)])
    assert result.exit_code == 0, result.output
    return [out / "cat_3.png", out / "cat_4.png"]


@pytest.fixture(scope="session")
def served_answer(pipe):
    """Pipeline.stream_ask on the fixture image ("What is in this image?", 12 tokens): (text, AnswerStats)."""
    from showo_mlx.images import load_image

    pieces, gen = [], pipe.stream_ask(load_image(REF / "images" / "magvit_in_0.png"), "What is in this image?", max_tokens=12)
    while True:
        try:
            pieces.append(next(gen))
        except StopIteration as end:
            return "".join(pieces), end.value
