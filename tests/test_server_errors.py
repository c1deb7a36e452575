"""`showo serve` under bad input and load: every mistake is a 4xx in OpenAI's error form (never a
500 or a traceback), the queue answers or 429s every request (none lost), a client that leaves
frees the worker at once, and the API key, body limit and image limits hold."""

from __future__ import annotations

import base64
import http.client
import io
import json
import threading
import time

import pytest
from PIL import Image

from conftest import REF
from server_harness import API_KEY, InProcessServer, multipart, request

IMAGE = REF / "images" / "magvit_in_0.png"
PHOTO = REF / "images" / "preprocess_in_0.png"


def png_bytes(size, mode="RGB", value=0) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat(content, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], **extra}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


CHAT, GEN, EDIT = "/v1/chat/completions", "/v1/images/generations", "/v1/images/edits"
LONG_PROMPT = "a very long prompt " * 60  # over the 126-token text block

# (case, method, path, body, status, code, param)
JSON_CASES = [
    ("malformed JSON", "POST", CHAT, b'{"messages": [', 400, "invalid_json", None),
    ("empty body", "POST", CHAT, b"", 400, "invalid_json", None),
    ("body not an object", "POST", CHAT, [1, 2], 400, "invalid_value", None),
    ("unknown model", "POST", CHAT, {"model": "gpt-4o", **chat("hi")}, 404, "model_not_found", "model"),
    ("empty messages", "POST", CHAT, {"messages": []}, 400, "invalid_value", "messages"),
    ("messages missing", "POST", CHAT, {"max_tokens": 3}, 400, "missing_field", "messages"),
    ("max_tokens as a string", "POST", CHAT, chat("hi", max_tokens="5"), 400, "invalid_value", "max_tokens"),
    ("stream not a bool", "POST", CHAT, chat("hi", stream="yes"), 400, "invalid_value", "stream"),
    ("temperature out of range", "POST", CHAT, chat("hi", temperature=5), 400, "invalid_value", "temperature"),
    ("unknown role", "POST", CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value", "messages.0.role"),
    ("last message not the user's", "POST", CHAT, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400, None, "messages"),
    ("empty text", "POST", CHAT, chat(""), 400, None, "messages"),
    ("two images", "POST", CHAT, chat([image_part(data_uri(png_bytes((8, 8)))), image_part(data_uri(png_bytes((8, 8))))]), 400, None, "messages[0].content[1].image_url"),
    ("undecodable image", "POST", CHAT, chat([{"type": "text", "text": "q"}, image_part(data_uri(b"not a picture"))]), 400, "invalid_image", "messages[0].content[1].image_url"),
    ("bad base64", "POST", CHAT, chat([image_part("data:image/png;base64,@@@")]), 400, "invalid_image", "messages[0].content[0].image_url"),
    ("missing image file", "POST", CHAT, chat([image_part("/nonexistent/picture.png")]), 400, "invalid_image", "messages[0].content[0].image_url"),
    ("oversized image", "POST", CHAT, chat([image_part(data_uri(png_bytes((300, 300))))]), 400, "image_too_large", "messages[0].content[0].image_url"),
    ("remote image not allowed", "POST", CHAT, chat([image_part("http://127.0.0.1:9/x.png")]), 400, "remote_images_disabled", "messages[0].content[0].image_url"),
    ("prompt over the context", "POST", CHAT, chat("word " * 2100), 400, "context_length_exceeded", "messages"),
    ("strict answer over the context", "POST", CHAT, chat("hello", max_tokens=5000, strict=True), 400, "context_length_exceeded", "max_tokens"),
    ("n over 8", "POST", GEN, {"prompt": "a cat", "n": 9}, 400, "invalid_value", "n"),
    ("n zero", "POST", GEN, {"prompt": "a cat", "n": 0}, 400, "invalid_value", "n"),
    ("n as a string", "POST", GEN, {"prompt": "a cat", "n": "2"}, 400, "invalid_value", "n"),
    ("prompt missing", "POST", GEN, {"n": 1}, 400, "missing_field", "prompt"),
    ("another size", "POST", GEN, {"prompt": "a cat", "size": "1024x1024"}, 400, "invalid_size", "size"),
    ("unknown image model", "POST", GEN, {"prompt": "a cat", "model": "dall-e-3"}, 404, "model_not_found", "model"),
    ("bad response_format", "POST", GEN, {"prompt": "a cat", "response_format": "gif"}, 400, "invalid_value", "response_format"),
    ("steps zero", "POST", GEN, {"prompt": "a cat", "steps": 0}, 400, "invalid_value", "steps"),
    ("partial_images over 3", "POST", GEN, {"prompt": "a cat", "partial_images": 4}, 400, "invalid_value", "partial_images"),
    ("unknown schedule", "POST", GEN, {"prompt": "a cat", "schedule": "zigzag", "steps": 1}, 400, None, None),
    ("strict prompt over the limit", "POST", GEN, {"prompt": LONG_PROMPT, "strict": True, "steps": 1}, 400, "prompt_too_long", "prompt"),
    ("unknown route", "GET", "/v1/nothing", None, 404, "not_found", None),
    ("wrong method", "GET", CHAT, None, 405, None, None),
    ("edits as JSON", "POST", EDIT, {"prompt": "x"}, 400, "invalid_content_type", None),
]


def check_error(status, headers, body, expected_status, code, param):
    assert status == expected_status, body
    assert headers["content-type"] == "application/json"
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "\n" not in err["message"] and "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err


@pytest.mark.parametrize("case", JSON_CASES, ids=[c[0] for c in JSON_CASES])
def test_bad_json_requests_are_4xx_in_openai_form(live_server, case):
    _, method, path, body, status, code, param = case
    check_error(*request(live_server, method, path, body), status, code, param)


def test_bad_edits_are_4xx(live_server):
    photo = PHOTO.read_bytes()
    cases = [
        ("no image", {"prompt": "x"}, {"mask": ("m.png", png_bytes((300, 200), "RGBA"))}, 400, "missing_field", "image"),
        ("neither mask nor direction", {"prompt": "x"}, {"image": ("i.png", photo)}, 400, "missing_field", "mask"),
        ("mask and direction", {"prompt": "x", "direction": "left"}, {"image": ("i.png", photo), "mask": ("m.png", png_bytes((300, 200), "RGBA"))}, 400, None, "direction"),
        ("mask of another size", {"prompt": "x"}, {"image": ("i.png", photo), "mask": ("m.png", png_bytes((64, 64), "RGBA"))}, 400, "invalid_mask", "mask"),
        ("unknown direction", {"prompt": "x", "direction": "sideways"}, {"image": ("i.png", photo)}, 400, "invalid_value", None),
        ("undecodable image", {"prompt": "x", "direction": "left"}, {"image": ("i.png", b"GIF89a broken")}, 400, "invalid_image", "image"),
        ("n out of range", {"prompt": "x", "direction": "left", "n": "12"}, {"image": ("i.png", photo)}, 400, "invalid_value", "n"),
        ("mask selects nothing", {"prompt": "x", "steps": "1"}, {"image": ("i.png", photo), "mask": ("m.png", png_bytes((300, 200), "RGBA", (0, 0, 0, 255)))}, 400, None, None),
    ]
    for name, fields, files, status, code, param in cases:
        body, ctype = multipart(fields, files)
        result = request(live_server, "POST", EDIT, body, {"Content-Type": ctype})
        try:
            check_error(*result, status, code, param)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


def test_api_key_and_body_limit(live_server):
    check_error(*request(live_server, "GET", "/v1/models", key=None), 401, "invalid_api_key", None)
    check_error(*request(live_server, "POST", CHAT, chat("hi"), key="wrong"), 401, "invalid_api_key", None)
    status, headers, page = request(live_server, "GET", "/", key=None)  # the page itself is public: it asks for the key
    assert status == 200 and b"<title>showo-mlx</title>" in page
    big = json.dumps(chat("x" * (1_100_000))).encode()  # over --max-body-mb 1
    check_error(*request(live_server, "POST", CHAT, big, {"Content-Type": "application/json"}), 413, "request_too_large", None)


def test_top_k_passes_through(live_server):
    status, _, body = request(live_server, "POST", GEN, {"prompt": "a cat", "top_k": 5, "steps": 1, "seed": 2})
    assert status == 200, body
    png = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert json.loads(png.text["showo-mlx"])["top_k"] == 5  # it reached the sampler's settings
    status, _, body = request(live_server, "POST", GEN, {"prompt": "a cat", "top_k": -1, "steps": 1})
    check_error(status, {"content-type": "application/json"}, body, 400, None, "top_k")


# -- load and disconnects ---------------------------------------------------------------------------------
def open_stream(server, body) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", CHAT, body=json.dumps(body), headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    return conn, conn.getresponse()


def wait_until(predicate, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def health(server) -> dict:
    return request(server, "GET", "/health")[2]


def test_sixteen_clients_and_a_disconnect(live_server, pipe):
    """A long streamed answer holds the worker; 16 clients × 2 requests arrive: 3 wait (--max-queue
    3), the rest get 429 with Retry-After. Closing the long stream cancels it at the next token,
    and the waiting requests are then answered at once. Nothing is lost."""
    before = health(live_server)["requests"]
    expected = pipe.complete("Hello", max_tokens=3)
    conn, long_answer = open_stream(live_server, chat("Once upon a time", max_tokens=1500, stream=True))
    assert long_answer.status == 200
    first = long_answer.readline()  # the answer has started: the worker is busy for ~1500 tokens
    assert first.startswith(b"data: ")

    results: list[tuple[int, dict, object]] = []
    lock = threading.Lock()

    def client():
        for _ in range(2):
            r = request(live_server, "POST", CHAT, chat("Hello", max_tokens=3), timeout=60)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    assert wait_until(lambda: health(live_server)["queue"]["waiting"] == 3 and len(results) >= 26, timeout=30)
    assert health(live_server)["queue"]["running"] is True

    closed_at = time.monotonic()
    long_answer.close()
    conn.close()  # the client leaves mid-stream
    for t in threads:
        t.join(60)
    freed_in = time.monotonic() - closed_at
    assert freed_in < 8.0, f"the worker was not freed promptly ({freed_in:.1f} s)"  # the full answer takes far longer

    statuses = [r[0] for r in results]
    assert len(results) == 32 and set(statuses) <= {200, 429}
    assert statuses.count(200) >= 6 and statuses.count(429) >= 20
    for status, headers, body in results:
        if status == 200:
            assert body["choices"][0]["message"]["content"] == expected
        else:
            assert int(headers["retry-after"]) >= 1 and body["error"]["code"] == "queue_full"

    assert wait_until(lambda: not health(live_server)["queue"]["running"], timeout=10)
    after = health(live_server)
    counts = {k: after["requests"][k] - before[k] for k in before}
    assert after["queue"]["waiting"] == 0
    assert counts["cancelled"] == 1 and counts["rejected"] == statuses.count(429)
    assert counts["completed"] == statuses.count(200) and counts["failed"] == 0
    assert counts["accepted"] == counts["completed"] + counts["cancelled"]  # every accepted request ended
    assert live_server.wait_for_line(r"\S+ POST /v1/chat/completions 200 \d+\.\d\ds", since=0)


def test_a_client_leaving_an_image_request_stops_it_at_the_next_step(live_server):
    """A non-streamed 400-step generation (tens of seconds on the fixture model) whose client gives
    up after a second: the server notices, MaskGIT stops at its next step, the worker is free."""
    before = health(live_server)["requests"]["cancelled"]
    conn = http.client.HTTPConnection(live_server.host, live_server.port, timeout=1.0)
    conn.request("POST", GEN, body=json.dumps({"prompt": "a cat", "steps": 400, "greedy": True}),
                 headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    left_at = time.monotonic()
    conn.close()
    assert wait_until(lambda: health(live_server)["requests"]["cancelled"] == before + 1, timeout=10)
    assert not health(live_server)["queue"]["running"]
    assert time.monotonic() - left_at < 10  # far less than the 400 steps would take


# -- in-process: remote images, and the chat format ------------------------------------------------------
def test_remote_images_when_allowed(pipe, tmp_path, served_answer):
    (tmp_path / "20250101-000000-0123456789ab.png").write_bytes(IMAGE.read_bytes())
    server = InProcessServer(pipe, allow_remote_images=True, output_dir=tmp_path)
    try:
        url = f"{server.url}/outputs/20250101-000000-0123456789ab.png"
        status, _, body = request(server, "POST", CHAT, chat([{"type": "text", "text": "What is in this image?"}, image_part(url)],
                                                             max_tokens=12), key=None)
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == served_answer[0]
    finally:
        server.stop()
    assert any(line.startswith("POST /v1/chat/completions 200") for line in server.lines)


def test_chat_history_uses_the_instruction_format():
    """With an image, Pipeline.stream_ask wraps the question as "USER: \\n{q} ASSISTANT:"; the
    history inside it follows the phi1.5 template the instruction tuning saw."""
    from showo_mlx.prompting import MMU_QUESTION_TEMPLATE
    from showo_mlx.server.chat import build_prompt, render
    from showo_mlx.server.schemas import Message

    tiny = png_bytes((4, 4))
    msgs = [Message(role="system", content="Be brief."),
            Message(role="user", content=[{"type": "text", "text": "q1"}, image_part(data_uri(tiny))]),
            Message(role="assistant", content="a1"),
            Message(role="user", content="q2")]
    seen = []
    prompt = build_prompt(msgs, lambda url, param: seen.append(param) or "IMAGE")
    assert prompt.image == "IMAGE" and seen == ["messages[1].content[1].image_url"]
    assert MMU_QUESTION_TEMPLATE.format(question=prompt.text) == "USER: \nBe brief.\nq1 ASSISTANT: a1<|endoftext|>USER: q2 ASSISTANT:"
    single = build_prompt([Message(role="user", content=[{"type": "text", "text": "What is it?"}, image_part("x")])], lambda u, p: "IMAGE")
    assert single.text == "What is it?"  # exactly `showo ask IMAGE "What is it?"`
    assert render([("user", "q1"), ("assistant", "a1"), ("user", "q2")]) == "USER: q1 ASSISTANT: a1<|endoftext|>USER: q2 ASSISTANT:"


def test_answer_room_is_lowered_to_fit_the_context(pipe):
    from showo_mlx.server.chat import ChatPrompt
    from showo_mlx.server.tasks import ChatSettings, _fit_context

    used = 1 + len(pipe.prompting.encode("hello"))
    room = pipe.cfg.max_position_embeddings - used
    assert _fit_context(pipe, ChatPrompt("hello"), ChatSettings(max_tokens=room)) == (room, [])
    fitted, warnings = _fit_context(pipe, ChatPrompt("hello"), ChatSettings(max_tokens=room + 10))
    assert fitted == room and "lowered" in warnings[0]


# -- the command ---------------------------------------------------------------------------------------------
def test_serve_command_errors_are_one_line(tmp_path):
    import socket

    from typer.testing import CliRunner

    from showo_mlx.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["serve", "--model", str(tmp_path / "missing"), "--port", "0"])
    assert r.exit_code == 2 and r.stderr.count("error:") == 1 and "Traceback" not in r.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = runner.invoke(app, ["serve", "--model", str(tmp_path / "missing"), "--port", str(busy.getsockname()[1])])
    assert r.exit_code == 2 and "cannot listen on 127.0.0.1" in r.stderr  # refused before any model is loaded
