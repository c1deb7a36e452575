"""`showo serve` throughput and latency, and its overhead over calling the Pipeline directly.

Run by hand (the tiny test fixture model unless --model is given; nothing is downloaded):

    python benchmarks/bench_server.py                      # fixture model, 20 requests per row
    python benchmarks/bench_server.py --requests 40 --clients 8
    python benchmarks/bench_server.py --model showlab/show-o --steps 18 --tokens 100

One process, one loaded Pipeline. For each workload (chat with an image, chat without, image
generation) it times R direct Pipeline calls and R sequential requests to an in-process server on
127.0.0.1 serving the same Pipeline, alternating the two (latency: p50, p95, and the server/direct
ratio of the means), then R requests from C concurrent clients (requests/s; the model runs one request at a time, so the
ceiling is the direct call rate). Every server answer is checked equal to the direct call's.
Ratios are comparable within one run only; the table records the load average.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXTURE = ROOT / "tests" / "fixtures" / "reference"
IMAGE = FIXTURE / "images" / "magvit_in_0.png"


def fixture_model() -> Path:
    from showo_mlx.convert import convert

    dst = Path(tempfile.mkdtemp(prefix="showo-bench-server-")) / "tiny"
    convert(FIXTURE / "showo", dst, vq=FIXTURE / "magvitv2", tokenizer=FIXTURE / "tokenizer", log=lambda m: None)
    return dst


class Server:
    """create_app over the given pipeline, on a uvicorn thread bound to a free loopback port."""

    def __init__(self, pipe, model_id: str, max_queue: int):
        import uvicorn

        from showo_mlx.server.app import ServerOptions, create_app
        from showo_mlx.server.work_queue import WorkQueue

        self.work = WorkQueue(lambda: pipe, max_queue=max_queue, log=lambda m: None)
        self.work.start()
        app = create_app(self.work, ServerOptions(model_id=model_id, log=lambda m: None,
                                                  output_dir=Path(tempfile.mkdtemp(prefix="showo-bench-out-"))))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def post(self, path: str, body: dict) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            data = json.loads(r.read())
            if r.status != 200:
                raise RuntimeError(f"{path}: {r.status} {data}")
            return data
        finally:
            conn.close()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.work.close()
        self.sock.close()


def workloads(pipe, args):
    from showo_mlx.images import load_image

    image = load_image(IMAGE)
    uri = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    question = "What is in this image?"
    chat_image = {"messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                            {"type": "image_url", "image_url": {"url": uri}}]}],
                  "max_tokens": args.tokens}
    chat_text = {"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": args.tokens}
    gen = {"prompt": "a rally car race", "steps": args.steps, "greedy": True}
    return [
        ("chat + image", "/v1/chat/completions", chat_image,
         lambda: pipe.ask(image, question, max_tokens=args.tokens),
         lambda r: r["choices"][0]["message"]["content"]),
        ("chat, text", "/v1/chat/completions", chat_text,
         lambda: pipe.complete("Once upon a time", max_tokens=args.tokens),
         lambda r: r["choices"][0]["message"]["content"]),
        ("image", "/v1/images/generations", gen,
         lambda: _png_pixels(pipe.generate("a rally car race", steps=args.steps, greedy=True)[0].image),
         lambda r: _png_pixels(r["data"][0]["b64_json"])),
    ]


def _png_pixels(image_or_b64) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    if isinstance(image_or_b64, str):
        image_or_b64 = Image.open(io.BytesIO(base64.b64decode(image_or_b64)))
    return np.asarray(image_or_b64.convert("RGB")).tobytes()


def interleaved(direct, served, n: int):
    """n timings of each, alternating direct and served calls so that both see the same machine
    load (on a shared machine it drifts within seconds); returns both lists and the last outputs."""
    d_times, s_times, d_out, s_out = [], [], None, None
    for _ in range(n):
        t = time.perf_counter()
        d_out = direct()
        d_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        s_out = served()
        s_times.append(time.perf_counter() - t)
    return d_times, s_times, d_out, s_out


def concurrent(server: Server, path: str, body: dict, n: int, clients: int) -> float:
    """Requests/s for n requests spread over `clients` threads."""
    counter = {"left": n}
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                if counter["left"] == 0:
                    return
                counter["left"] -= 1
            server.post(path, body)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n / (time.perf_counter() - start)


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model to serve (default: the test fixture, converted to a temporary folder)")
    p.add_argument("--requests", type=int, default=20, help="timed calls per row (direct, sequential, concurrent)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients for requests/s")
    p.add_argument("--steps", type=int, default=4, help="MaskGIT steps per image")
    p.add_argument("--tokens", type=int, default=16, help="answer tokens per chat request")
    args = p.parse_args()

    from showo_mlx.pipeline import Pipeline, load

    pipe = load(args.model, log=lambda m: None) if args.model else Pipeline(fixture_model(), name="fixture")
    server = Server(pipe, pipe.name, max_queue=max(args.clients, 1))
    rows = []
    try:
        for name, path, body, direct, answer in workloads(pipe, args):
            direct(), server.post(path, body)  # warm both paths (MAGVIT load, first-call allocations)
            d_times, s_times, d_out, s_out = interleaved(direct, lambda: server.post(path, body), args.requests)
            if answer(s_out) != d_out:
                raise SystemExit(f"{name}: the server's answer differs from the direct call's")
            rps = concurrent(server, path, body, args.requests, args.clients)
            rows.append((name, d_times, s_times, rps))
    finally:
        server.stop()

    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"showo serve vs direct Pipeline calls: {pipe.name}, {args.requests} requests per row, "
          f"{args.clients} concurrent clients, {args.steps} steps, {args.tokens} tokens; load average {load1:.2f}")
    print(f"{'workload':<14} {'direct p50':>10} {'p95':>8} {'server p50':>10} {'p95':>8} {'server/direct':>13} "
          f"{'direct req/s':>12} {'server req/s':>12}")
    for name, d, s, rps in rows:
        print(f"{name:<14} {statistics.median(d):>9.3f}s {pct(d, 95):>7.3f}s {statistics.median(s):>9.3f}s "
              f"{pct(s, 95):>7.3f}s {statistics.mean(s) / statistics.mean(d):>12.3f}x {1 / statistics.mean(d):>12.2f} {rps:>12.2f}")


if __name__ == "__main__":
    main()
