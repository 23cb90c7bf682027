"""The FastAPI app: OpenAI's chat completions (plain and streamed), models and health, over one continuous batcher.

One background thread (`ContinuousBatcher`) owns the model and runs every forward; request handlers only parse,
decode audio in the thread pool, queue decode jobs and await their futures, so the event loop never waits for a
forward. Every refusal is a 4xx JSON body in OpenAI's error shape (`schema.error_body`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from diffa2.diffusion.continuous import DecodeJob, JobResult
from diffa2.inference import AudioQA
from diffa2.serve.audio import RequestError, decode_input_audio
from diffa2.serve.planning import Defaults, decode_config, read_conversation
from diffa2.serve.schema import DECODING_FIELDS, ChatRequest, Limits, error_body


@dataclass(frozen=True)
class ServeOptions:
    """Everything the app needs besides the model."""

    model_name: str
    limits: Limits = field(default_factory=Limits)
    defaults: Defaults = field(default_factory=Defaults)
    api_key: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 5.0


def validation_message(error: ValidationError) -> tuple[str, str | None]:
    """A pydantic error as one readable line naming each field at fault, and the first field."""
    lines, params = [], []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "body"
        params.append(where)
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown field {where!r} (decoding settings go in extra_body: {', '.join(DECODING_FIELDS)})")
        else:
            lines.append(f"{where}: {item['msg']}")
    return "; ".join(lines), params[0] if params else None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is over `limit` bytes."""
    too_big = RequestError(f"the request body is over the limit of {limit} bytes", status=413,
                           code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def check_content_type(content_type: str) -> None:
    """A body declared as anything but JSON (a form, say: curl -d's default) is a 415; an undeclared one is read."""
    if content_type and content_type.split(";")[0].strip().lower() != "application/json":
        raise RequestError(f"Content-Type {content_type!r} is not application/json: send the body as JSON with "
                           "'Content-Type: application/json'", status=415, code="unsupported_media_type")


def parse_request(body: bytes) -> ChatRequest:
    """JSON body -> ChatRequest, or a 400 naming what is wrong."""
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise RequestError(f"the request body is not JSON ({exc})", code="invalid_json") from exc
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise RequestError(message, param=param) from exc


def finish_reason(token_ids: list[int], stops: set[int]) -> tuple[str, int]:
    """("stop", answer length) when the answer ends with a stop token, else ("length", whole canvas)."""
    end = next((i for i, t in enumerate(token_ids) if t in stops), None)
    return ("length", len(token_ids)) if end is None else ("stop", end)


def create_app(qa: AudioQA, options: ServeOptions) -> FastAPI:
    """The server's ASGI app for `qa`; its lifespan starts and stops the batcher thread."""
    batcher = qa.batcher(max_batch=options.max_batch, max_wait_ms=options.max_wait_ms)
    stops = {qa.chat.ids.eos, qa.chat.ids.eot}
    limits = options.limits

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            batcher.close()

    app = FastAPI(title="DIFFA-2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.exception_handler(RequestError)
    async def refused(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), kind=exc.kind, param=exc.param, code=exc.code), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)), exc.status_code)

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error: {exc}", kind="server_error"), 500)

    def authorize(request: Request) -> None:
        if options.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
            raise RequestError("missing or wrong API key: send 'Authorization: Bearer <key>'", status=401,
                               code="invalid_api_key")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": options.model_name, "active": batcher.active, "queued": batcher.queued}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        return {"object": "list", "data": [{"id": options.model_name, "object": "model", "created": 0,
                                            "owned_by": "diffa2"}]}

    def answer_text(token_ids: torch.Tensor) -> str:
        return qa.chat.decode_answer(token_ids.tolist())

    def committed_text(canvas: torch.Tensor) -> str:
        """The answer text of the committed tokens left of the first [MASK]."""
        ids = canvas.tolist()
        end = next((i for i, t in enumerate(ids) if t == qa.chat.ids.mask), len(ids))
        return qa.chat.decode_answer(ids[:end])

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        check_content_type(request.headers.get("content-type", ""))
        chat = parse_request(await read_body(request, limits.max_body_bytes))
        if chat.model != options.model_name:
            raise RequestError(f"model {chat.model!r} is not served here; this server serves "
                               f"{options.model_name!r}", status=404, param="model", code="model_not_found")
        if chat.n > limits.max_n:
            raise RequestError(f"n {chat.n} is over the limit of {limits.max_n}", param="n")
        question = read_conversation(chat, limits)
        config = decode_config(chat, options.defaults, limits)
        waves = [await run_in_threadpool(decode_input_audio, audio, max_seconds=limits.max_audio_seconds, param=param)
                 for audio, param in question.clips]
        jobs = [DecodeJob((waves, question.conversation), config, seed=(chat.seed or 0) + i) for i in range(chat.n)]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": options.model_name}
        if chat.stream:
            return StreamingResponse(stream(jobs, head), media_type="text/event-stream")
        try:
            results: list[JobResult] = await asyncio.gather(*(asyncio.wrap_future(batcher.submit(j)) for j in jobs))
        finally:
            for job in jobs:
                job.abandoned = True  # a no-op for finished rows; frees the slots of a cancelled request
        choices, completion = [], 0
        for i, result in enumerate(results):
            reason, length = finish_reason(result.token_ids.tolist(), stops)
            completion += length
            choices.append({"index": i, "message": {"role": "assistant", "content": answer_text(result.token_ids)},
                            "finish_reason": reason, "logprobs": None})
        prompt = results[0].prompt_positions
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage}

    async def stream(jobs: list[DecodeJob], head: dict) -> AsyncIterator[str]:
        """SSE: a role chunk per choice, then the committed answer text as it grows, a finish chunk, [DONE]."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, torch.Tensor | None]] = asyncio.Queue()
        for i, job in enumerate(jobs):
            job.on_step = lambda x, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, x.clone()))
        futures = [batcher.submit(job) for job in jobs]
        for i, future in enumerate(futures):
            future.add_done_callback(lambda _, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, None)))

        def chunk(index: int, delta: dict, reason: str | None = None) -> str:
            body = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}]}
            return f"data: {json.dumps(body)}\n\n"

        sent = [""] * len(jobs)
        try:
            for i in range(len(jobs)):
                yield chunk(i, {"role": "assistant", "content": ""})
            for _ in range(len(jobs)):
                while True:
                    i, canvas = await events.get()
                    if canvas is None:
                        break
                    text = committed_text(canvas)
                    # Only growth is sent (a delta cannot retract text), never a cut multi-byte character.
                    if len(text) > len(sent[i]) and text.startswith(sent[i]) and not text.endswith("\ufffd"):
                        yield chunk(i, {"content": text[len(sent[i]) :]})
                        sent[i] = text
                try:
                    result = futures[i].result()
                except Exception as exc:  # noqa: BLE001 - reported to the client in OpenAI's shape
                    yield f"data: {json.dumps(error_body(str(exc), kind='server_error'))}\n\n"
                    return
                final = answer_text(result.token_ids)
                rest = final[len(sent[i]) :] if final.startswith(sent[i]) else ""
                yield chunk(i, {"content": rest} if rest else {},
                            finish_reason(result.token_ids.tolist(), stops)[0])
            yield "data: [DONE]\n\n"
        finally:
            for job in jobs:
                job.abandoned = True

    return app
