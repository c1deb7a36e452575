"""The FastAPI application: OpenAI-compatible routes over one `WorkQueue`, and the browser page.

Routes (docs/SERVER.md is the reference):
    GET  /                        the page (static/index.html)
    GET  /health                  model, queue, memory, request counts
    GET  /v1/models[/{id}]        the one served model
    POST /v1/chat/completions     answers (stream_ask / stream_complete), SSE with `stream`
    POST /v1/images/generations   text to image, SSE partial images with `stream`
    POST /v1/images/edits         multipart: inpainting (mask) or extension (direction)
    GET  /outputs/{name}          PNGs of `response_format=url`
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import mlx.core as mx
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .chat import build_prompt
from .errors import APIError, bad_request, from_validation
from .inputs import ImageReader
from .middleware import APIKey, BodyLimit, RequestLog
from .outputs import OUTPUT_NAME, b64
from .schemas import ChatCompletionRequest, ImageEditRequest, ImageGenerationRequest, edit_request_from_form
from .tasks import DEFAULT_MAX_TOKENS, ChatSettings, ImageJob, chat_work, image_work
from .work_queue import TERMINAL, Job, QueueFull, WorkQueue

STATIC = Path(__file__).resolve().parent / "static"
DISCONNECT_POLL = 0.2  # seconds between checks that a waiting client is still there
CLIENT_GONE = 499  # logged status of a request whose client left (nginx's convention)


@dataclass
class ServerOptions:
    model_id: str
    api_key: str | None = None
    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = 4096 * 4096
    allow_remote_images: bool = False
    output_dir: Path = Path("showo-outputs")
    log: Callable[[str], None] = print


class ClientGone(Exception):
    pass


def create_app(work: WorkQueue, options: ServerOptions) -> FastAPI:
    """The app serving `work.pipe` (the queue must be started)."""
    app = FastAPI(title="showo-mlx", version=__version__, docs_url=None, redoc_url=None)
    reader = ImageReader(options.max_image_pixels, options.max_body_bytes, options.allow_remote_images)
    pipe = work.pipe
    created = int(time.time())

    # -- errors in OpenAI's form -------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        message = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        err = APIError(e.status_code, message.get(e.status_code, str(e.detail)), code="not_found" if e.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        options.log(f"internal error on {request.url.path}: {type(e).__name__}: {e}")
        err = APIError(500, f"internal error ({type(e).__name__}); see the server log", code="internal_error")
        return JSONResponse(err.body(), status_code=500)

    # -- helpers ---------------------------------------------------------------------------------
    def check_model(name: str | None) -> None:
        if name is None or name in (options.model_id, Path(options.model_id).name, "showo"):
            return
        raise APIError(404, f"model {name!r} is not served here; this server serves {options.model_id!r} (see GET /v1/models)",
                       param="model", code="model_not_found")

    def submit(name: str, fn) -> Job:
        try:
            return work.submit(Job(name, fn))
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": str(e.retry_after)}) from None

    def check_size(size: str | None) -> None:
        r = pipe.resolution
        if size in (None, "auto", f"{r}x{r}"):
            return
        raise bad_request(f"size {size!r} is not available: this model makes {r}x{r} images (or use 'auto')", "size", "invalid_size")

    async def next_event(request: Request, job: Job, pending: dict) -> tuple[str, Any]:
        """The job's next event; cancels the job and raises ClientGone if the client disconnects
        while we wait (checked every DISCONNECT_POLL seconds)."""
        while True:
            getter = pending.get("get")
            if getter is None:
                getter = pending["get"] = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL)
            if done:
                pending["get"] = None
                return getter.result()
            if await request.is_disconnected():
                getter.cancel()
                job.cancel()
                raise ClientGone()

    async def final_event(request: Request, job: Job, pending: dict, on_delta=None):
        """A non-streamed request's result: the job's terminal payload (each "delta" on the way goes
        to `on_delta`); None when the client left or the job was cancelled; a job's error is raised."""
        try:
            while True:
                kind, payload = await next_event(request, job, pending)
                if kind == "delta" and on_delta is not None:
                    on_delta(payload)
                elif kind in TERMINAL:
                    break
        except ClientGone:
            return None
        if kind == "error":
            raise payload
        return None if kind == "cancelled" else payload

    async def first_event(request: Request, job: Job) -> tuple[str, Any, dict]:
        """Wait for the job to start producing; errors before that become plain 4xx responses."""
        pending: dict = {}
        kind, payload = await next_event(request, job, pending)
        if kind == "error":
            raise payload
        if kind == "cancelled":
            raise ClientGone()
        return kind, payload, pending

    def sse(data: Any, event: str | None = None) -> str:
        head = f"event: {event}\n" if event else ""
        return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"

    def stream(body: AsyncIterator[str], job: Job) -> StreamingResponse:
        async def guarded():
            finished = False
            try:
                async for chunk in body:
                    yield chunk
                finished = True
            finally:
                if not finished:
                    job.cancel()  # the client left (or the stream broke): free the worker

        return StreamingResponse(guarded(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- page and status --------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": options.model_id,
            "loaded": pipe is not None,
            "resolution": pipe.resolution,
            "queue": {"waiting": work.waiting, "running": work.busy, "max_queue": work.max_queue},
            "memory": {"active_bytes": mx.get_active_memory(), "peak_bytes": mx.get_peak_memory(), "cache_bytes": mx.get_cache_memory()},
            "requests": dict(work.stats),
            "version": __version__,
        }

    def model_card() -> dict:
        return {"id": options.model_id, "object": "model", "created": created, "owned_by": "showo-mlx"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    @app.get("/outputs/{name}")
    async def output(name: str):
        path = options.output_dir / name
        if not OUTPUT_NAME.match(name) or not path.is_file():
            raise APIError(404, f"no output named {name!r}", param="name", code="not_found")
        return FileResponse(path, media_type="image/png")

    # -- chat ------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request, ChatCompletionRequest)
        check_model(body.model)
        prompt = await run_in_threadpool(build_prompt, body.messages, reader.from_url)
        settings = ChatSettings(
            max_tokens=body.max_completion_tokens or body.max_tokens or DEFAULT_MAX_TOKENS,
            temperature=body.temperature if body.temperature is not None else 0.0,  # Show-o answers greedily by default
            top_p=body.top_p if body.top_p is not None else 0.0,
            top_k=body.top_k or 0,
            seed=body.seed,
            strict=body.strict,
        )
        job = submit("chat", chat_work(prompt, settings))
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": options.model_id}
        try:
            kind, start, pending = await first_event(request, job)
        except ClientGone:
            return Response(status_code=CLIENT_GONE)
        warnings = start["warnings"]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return stream(chat_chunks(request, job, pending, head, warnings, include_usage), job)
        text: list[str] = []
        payload = await final_event(request, job, pending, on_delta=text.append)
        if payload is None:
            return Response(status_code=CLIENT_GONE)
        stats = payload["stats"]
        out = {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)}, "finish_reason": stats.finish_reason}],
            "usage": usage(stats),
        }
        if warnings:
            out["warnings"] = warnings
        return out

    async def chat_chunks(request, job, pending, head, warnings, include_usage) -> AsyncIterator[str]:
        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            return sse({**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra})

        yield chunk({"role": "assistant", "content": ""}, **({"warnings": warnings} if warnings else {}))
        while True:
            try:
                kind, payload = await next_event(request, job, pending)
            except ClientGone:
                return
            if kind == "delta":
                yield chunk({"content": payload})
            elif kind == "done":
                stats = payload["stats"]
                yield chunk({}, stats.finish_reason)
                if include_usage:
                    yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(stats)})
                break
            elif kind == "error":
                yield sse(payload.body())
                break
            elif kind == "cancelled":
                return
        yield "data: [DONE]\n\n"

    def usage(stats) -> dict:
        return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                "total_tokens": stats.prompt_tokens + stats.completion_tokens}

    # -- images ----------------------------------------------------------------------------------
    @app.post("/v1/images/generations")
    async def generations(request: Request):
        body = await read_json(request, ImageGenerationRequest)
        check_model(body.model)
        check_size(body.size)
        spec = image_spec(body, "generate")
        return await respond_images(request, body, spec, "image_generation")

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        form = await read_form(request)
        try:
            body = ImageEditRequest.model_validate(edit_request_from_form(form["fields"]))
        except ValidationError as e:
            raise from_validation(e) from None
        check_model(body.model)
        image_file, mask_file = form["files"].get("image"), form["files"].get("mask")
        if image_file is None:
            raise bad_request("missing the 'image' file to edit (multipart field 'image')", "image", "missing_field")
        if body.direction and mask_file is not None:
            raise bad_request("give either a mask (inpainting) or direction (extension), not both", "direction")
        if not body.direction and mask_file is None:
            raise bad_request("give a mask (transparent = repaint) or direction=left|right|up|down to extend", "mask", "missing_field")
        task = "extend" if body.direction else "inpaint"
        if task == "inpaint":
            check_size(body.size)
        elif body.size not in (None, "auto"):
            raise bad_request("an extended image is larger than the model's size; leave size out (or 'auto')", "size", "invalid_size")
        image = await run_in_threadpool(reader.from_bytes, image_file, "image")
        mask = None
        if mask_file is not None:
            mask = await run_in_threadpool(reader.from_bytes, mask_file, "mask", True)
            if mask.size != image.size:
                raise bad_request(f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}; they must match",
                                  "mask", "invalid_mask")
        spec = image_spec(body, task, image=image, mask=mask, directions=list(body.direction or []), offset=body.offset)
        return await respond_images(request, body, spec, "image_edit")

    def image_spec(body, task: str, **extra) -> ImageJob:
        return ImageJob(
            task=task, prompt=body.prompt, n=body.n, seed=body.seed, steps=body.steps, guidance=body.guidance,
            temperature=body.temperature, schedule=body.schedule, greedy=body.greedy, top_k=body.top_k, strict=body.strict,
            partial_images=body.partial_images if body.stream else 0,
            save_to=options.output_dir if body.response_format == "url" else None, **extra)

    async def respond_images(request: Request, body, spec: ImageJob, prefix: str):
        job = submit(f"images.{spec.task}", image_work(spec, prefix))
        base = str(request.base_url)

        def item(img: dict) -> dict:
            out = {"b64_json": b64(img["png"])} if body.response_format == "b64_json" else {"url": f"{base}outputs/{img['name']}"}
            return {**out, "revised_prompt": None, "seed": img["seed"]}

        if body.stream:
            try:
                kind, payload, pending = await first_event(request, job)
            except ClientGone:
                return Response(status_code=CLIENT_GONE)
            return stream(image_events(request, job, pending, (kind, payload), item, prefix), job)
        payload = await final_event(request, job, {})
        if payload is None:
            return Response(status_code=CLIENT_GONE)
        out = {"created": int(time.time()), "data": [item(i) for i in payload["images"]], "output_format": "png",
               "size": payload["images"][0]["size"], "usage": image_usage(payload["usage"])}
        if payload["warnings"]:
            out["warnings"] = payload["warnings"]
        return out

    async def image_events(request, job, pending, first, item, prefix) -> AsyncIterator[str]:
        event = first
        while True:
            kind, payload = event
            if kind == "partial":
                yield sse({**payload, "created_at": int(time.time()), "background": "opaque", "output_format": "png",
                           "quality": "auto"}, payload["type"])
            elif kind == "done":
                for index, img in enumerate(payload["images"]):
                    data = {"type": f"{prefix}.completed", **item(img), "image_index": index, "created_at": int(time.time()),
                            "size": img["size"], "background": "opaque", "output_format": "png", "quality": "auto",
                            "usage": image_usage(payload["usage"])}
                    if payload["warnings"]:
                        data["warnings"] = payload["warnings"]
                    yield sse(data, data["type"])
                return
            elif kind == "error":
                yield sse(payload.body(), "error")
                return
            elif kind == "cancelled":
                return
            try:
                event = await next_event(request, job, pending)
            except ClientGone:
                return

    def image_usage(u: dict) -> dict:
        return {"input_tokens": u["input_tokens"], "output_tokens": u["output_tokens"],
                "total_tokens": u["input_tokens"] + u["output_tokens"],
                "input_tokens_details": {"text_tokens": u["input_tokens"], "image_tokens": 0}}

    # -- body parsing ----------------------------------------------------------------------------
    async def read_json(request: Request, model: type[BaseModel]):
        raw = await request.body()
        if not raw.strip():
            raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            raise bad_request(f"malformed JSON{where}: {getattr(e, 'msg', e)}", code="invalid_json") from None
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise from_validation(e) from None

    async def read_form(request: Request) -> dict:
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise bad_request("image edits take multipart/form-data (fields image, mask, prompt, ...)", code="invalid_content_type")
        try:
            form = await request.form(max_part_size=options.max_body_bytes)
        except APIError:
            raise
        except Exception as e:  # the multipart parser's complaints (malformed parts, ...)
            raise bad_request(f"malformed multipart body: {e}", code="invalid_multipart") from None
        fields: dict[str, list[str]] = {}
        files: dict[str, bytes] = {}
        for name, value in form.multi_items():
            key = name[:-2] if name.endswith("[]") else name
            if hasattr(value, "read"):
                if key in files:
                    raise bad_request(f"only one '{key}' file is read; Show-o edits one image", key)
                files[key] = await value.read()
            elif key in ("image", "mask"):
                raise bad_request(f"'{key}' must be a file upload", key)
            else:
                fields.setdefault(key, []).append(value)
        await form.close()
        return {"fields": fields, "files": files}

    # Middleware, innermost first: the key is checked before the body is read, every request is logged.
    app.add_middleware(APIKey, key=options.api_key)
    app.add_middleware(BodyLimit, max_bytes=options.max_body_bytes)
    app.add_middleware(RequestLog, log=options.log)
    return app
