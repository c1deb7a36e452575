"""`showo serve` through the official `openai` client: a live server (subprocess on a free
127.0.0.1 port, the converted fixture model) answers chat with an image (streamed and not), plain
text, image generation (b64, url, streamed previews) and edits (an RGBA mask, an extension) with
exactly what the CLI / Pipeline produce for the same settings."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from conftest import REF
from server_harness import API_KEY, multipart, request
from showo_mlx.images import load_image, read_png_metadata

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency (pip install -e '.[dev]')")

IMAGE = REF / "images" / "magvit_in_0.png"
PHOTO, MASK = REF / "images" / "preprocess_in_0.png", REF / "images" / "inpaint_mask.png"


@pytest.fixture(scope="module")
def client(live_server):
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def png(b64_or_bytes) -> Image.Image:
    data = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


# -- status ------------------------------------------------------------------------------------------
def test_models_health_and_request_log(client, live_server, converted):
    assert [m.id for m in client.models.list().data] == [str(converted)]
    mark = len(live_server.lines)
    status, _, health = request(live_server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["loaded"] is True
    assert health["resolution"] == 128 and health["queue"]["max_queue"] == 3
    assert health["memory"]["active_bytes"] > 0
    assert live_server.wait_for_line(r"\S+ GET /health 200 \d+\.\d\ds", since=mark)
    startup = "\n".join(live_server.lines[:5])
    assert "loading" in startup and "loaded" in startup and "http://127.0.0.1:" in startup


# -- chat ---------------------------------------------------------------------------------------------
def test_chat_with_an_image_equals_ask(client, pipe, served_answer):
    question = "What is in this image?"
    expected, stats = served_answer
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_uri(IMAGE)}}]
    r = client.chat.completions.create(model="showo", messages=[{"role": "user", "content": content}], max_tokens=12)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == stats.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (stats.prompt_tokens, stats.completion_tokens)
    assert r.usage.prompt_tokens > pipe.cfg.num_vq_tokens  # the image's tokens are counted

    # streamed, with the image given as a local path this time
    content[1] = {"type": "image_url", "image_url": {"url": str(IMAGE)}}
    chunks = list(client.chat.completions.create(model="showo", messages=[{"role": "user", "content": content}], max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == expected and len(deltas) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [stats.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == stats.completion_tokens


def test_chat_without_an_image_is_text_completion(client, pipe):
    r = client.chat.completions.create(model="showo", messages=[{"role": "user", "content": "Once upon a time"}], max_tokens=8)
    assert r.choices[0].message.content == pipe.complete("Once upon a time", max_tokens=8)
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model="showo", messages=history, max_tokens=8)
    rendered = "USER: Hi ASSISTANT: Hello.<|endoftext|>USER: Name a colour. ASSISTANT:"  # phi1.5 template
    assert r.choices[0].message.content == pipe.complete(rendered, max_tokens=8)


# -- images -------------------------------------------------------------------------------------------
def test_generate_b64_and_url_equal_the_cli(client, live_server, served_cli_images):
    r = client.images.generate(prompt="a red cat", n=2, size="128x128", extra_body={"steps": 2, "guidance": 1.5, "seed": 3})
    assert len(r.data) == 2
    for item, cli_png in zip(r.data, served_cli_images):
        served = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert served.text == Image.open(cli_png).text  # the same metadata (compared first: a clearer failure)
        assert base64.b64decode(item.b64_json) == cli_png.read_bytes()  # same pixels, same metadata, same bytes
    assert r.size == "128x128" and r.output_format == "png"

    r = client.images.generate(prompt="a red cat", response_format="url", extra_body={"steps": 2, "guidance": 1.5, "seed": 4})
    url = r.data[0].url
    assert url.startswith(live_server.url + "/outputs/")
    status, headers, body = request(live_server, "GET", url[len(live_server.url):])
    assert status == 200 and headers["content-type"] == "image/png"
    assert body == served_cli_images[1].read_bytes()
    assert read_png_metadata(live_server.output_dir / url.rsplit("/", 1)[1]) == read_png_metadata(served_cli_images[1])
    status, _, _ = request(live_server, "GET", url[len(live_server.url):], key=None)
    assert status == 401  # outputs are behind the API key too


def test_generate_stream_and_prompt_truncation(client):
    """A streamed request without partial images is one completed event; a prompt over the
    126-token limit is truncated as the CLI does, with a warning."""
    events = list(client.images.generate(prompt="a very long prompt " * 60, stream=True, extra_body={"steps": 1, "greedy": True}))
    assert [e.type for e in events] == ["image_generation.completed"]
    assert events[0].warnings == ["prompt truncated to the model's 126-token limit"]
    assert png(events[0].b64_json).size == (128, 128) and events[0].usage.output_tokens == 64


def rgba_mask(path) -> tuple[bytes, Image.Image]:
    """The fixture's white-is-repaint mask in OpenAI's form (transparent = repaint), and the
    equivalent CLI mask."""
    repaint = np.asarray(Image.open(path).convert("L")) >= 128
    alpha = np.where(repaint, 0, 255).astype(np.uint8)
    rgba = np.dstack([np.zeros_like(alpha)] * 3 + [alpha])
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    return buf.getvalue(), Image.fromarray(np.where(repaint, 255, 0).astype(np.uint8), "L")


def test_edit_with_an_rgba_mask_equals_inpaint_streamed(client, pipe):
    mask_png, cli_mask = rgba_mask(MASK)
    expected = pipe.inpaint(load_image(PHOTO), cli_mask, "a red bus", steps=2, greedy=True, seed=11)[0]
    events = list(client.images.edit(image=("photo.png", PHOTO.read_bytes(), "image/png"), mask=("mask.png", mask_png, "image/png"),
                                     prompt="a red bus", stream=True, partial_images=1, extra_body={"steps": 2, "greedy": True, "seed": 11}))
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    preview, out = png(events[0].b64_json), png(events[1].b64_json)
    assert events[0].partial_image_index == 0 and preview.size == (128, 128)  # the MaskGIT state after step 1 of 2
    assert not np.array_equal(np.asarray(preview), np.asarray(out))
    assert np.array_equal(np.asarray(out), np.asarray(expected.image))
    assert out.text == expected.metadata(out.text["model"]) and out.text["task"] == "inpaint"


def test_edit_with_a_direction_extends(live_server, pipe):
    expected = pipe.extrapolate(load_image(IMAGE), "a lake", ["left"], seed=5, steps=1)[0]
    body, ctype = multipart({"prompt": "a lake", "direction": "left", "steps": "1", "seed": "5"},
                            {"image": ("in.png", IMAGE.read_bytes())})
    status, _, r = request(live_server, "POST", "/v1/images/edits", body, {"Content-Type": ctype})
    assert status == 200, r
    out = png(r["data"][0]["b64_json"])
    assert out.size == (192, 128) and r["size"] == "192x128"
    assert np.array_equal(np.asarray(out), np.asarray(expected.image))
    assert out.text["directions"] == "left" and out.text["seed"] == "5"
