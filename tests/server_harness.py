"""Starting and stopping `showo serve` for the server tests: as a real subprocess (the command users
run) or in-process on a uvicorn thread (for variants sharing the session's loaded pipeline). Both
bind 127.0.0.1 on a free port and are stopped by the fixture that started them."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

API_KEY = "test-key-123"
STARTUP_TIMEOUT = 90.0  # seconds: imports + loading the tiny model, on a busy 2-core machine


# The in-process commands the server's answers are compared with run on the BLAS the test process
# has; `showo` would otherwise re-exec itself with OpenBLAS, whose float rounding differs and can
# change a sampled MaskGIT code.
ENV = {"SHOWO_OPENBLAS": "0"}


class LiveServer:
    """A `showo serve` subprocess. `lines` collects its stderr (the log) as it runs."""

    def __init__(self, model: Path, *args: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "showo_mlx.cli", "serve", "--model", str(model), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **ENV, **(env or {})})
        self.lines: list[str] = []
        self._started = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._started.wait(STARTUP_TIMEOUT) or self.url is None:
            self.stop()
            raise RuntimeError("showo serve did not start:\n" + "\n".join(self.lines))
        self.host, self.port = re.match(r"http://([\d.]+):(\d+)", self.url).groups()
        self.port = int(self.port)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            m = re.search(r"serving .* on (http://[\d.]+:\d+)", line)
            if m:
                self.url = m.group(1)
                self._started.set()
        self._started.set()  # exited

    def wait_for_line(self, pattern: str, since: int = 0, timeout: float = 5.0) -> str | None:
        """The first log line from index `since` on that matches `pattern` (waits for it)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines[since:]:
                if re.fullmatch(pattern, line):
                    return line
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # as Ctrl-C
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


class InProcessServer:
    """create_app over a WorkQueue that serves an already loaded pipeline, on a uvicorn thread."""

    def __init__(self, pipe, **options):
        import uvicorn

        from showo_mlx.server.app import ServerOptions, create_app
        from showo_mlx.server.work_queue import WorkQueue

        self.lines: list[str] = []
        self.work = WorkQueue(lambda: pipe, max_queue=options.pop("max_queue", 4), log=self.lines.append)
        self.work.start()
        app = create_app(self.work, ServerOptions(model_id=options.pop("model_id", pipe.name), log=self.lines.append, **options))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.host, self.port = self.sock.getsockname()
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.work.close()
        self.sock.close()


def request(server, method: str, path: str, body=None, headers: dict | None = None, key: str | None = API_KEY,
            timeout: float = 120.0):
    """(status, headers, parsed JSON or raw bytes). `body`: dict/list → JSON, bytes/str → as is."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    hdrs = dict(headers or {})
    if key:
        hdrs.setdefault("Authorization", f"Bearer {key}")
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        raw = r.read()
        try:
            data = json.loads(raw)
        except ValueError:
            data = raw
        return r.status, dict(r.getheaders()), data
    finally:
        conn.close()


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    """A multipart/form-data body from text fields and {name: (filename, bytes)} files."""
    boundary = "showoTestBoundary7MA4YWxkTrZu0gW"
    out = bytearray()
    for name, value in fields.items():
        for v in value if isinstance(value, list) else [value]:
            out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{v}\r\n'.encode()
    for name, (filename, data) in files.items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"
