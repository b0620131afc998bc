"""`mlx-flash serve`: an OpenAI-compatible HTTP server for a flash model.

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (JSON, or server-sent events with
`"stream": true`), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`. Request fields:
`model`, `messages` / `prompt`, `max_tokens` (`max_completion_tokens`), `temperature`, `top_p`,
`stop`, `seed`, `stream`, `stream_options.include_usage`, `n` (1 only), `user`. Any other field
is a 400 that names it, as is malformed JSON; a body over `max_body_bytes` is a 413. The
limits on stop strings, prompt size and seed are in serve_api.py, all refused before the
tokenizer or the model sees the request.

One model, one request at a time: generations run in arrival order on a single worker thread
(the FFN caches and the flash store are per model, and two decodes at once would only split the
same disk and cores). At most `max_queue` requests wait behind the running one; beyond that the
server answers 503 at once (with Retry-After) rather than holding connections. A client that
disconnects - mid-stream, or while queued - has its generation stopped at the next token.
Prompts are tokenized on a separate thread, so the event loop (and /health) keeps answering.
A generation that raises fails only its own request: 503 `io_error` for an OSError (a failed
read of the flash store), 500 `model_error` otherwise, or for a stream an error event and then
`[DONE]`; it is logged, counted in /health's `failed`, and the worker serves the next request.

HTTP is Starlette on uvicorn (h11), not mlx_lm.server: that server is a hand-rolled
`http.server` handler whose model loader is `mlx_lm.load` (ours is `mlx_flash.load`), it
ignores unknown fields instead of rejecting them, has no queue bound and no body limit, and warns
that it is not meant for production. Starlette gives routing, streaming responses that notice
disconnects, and clean shutdown; pydantic checks the request bodies (strict types, unknown fields
refused); generation itself is mlx_lm's `stream_generate`, as everywhere here. All three come
with the `serve` extra: pip install "mlx-flash[serve]".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from ..runtime.generate import conversation_ids, stream_generate
from .common import add_model_arguments, load_model, model_dir

try:
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from .serve_api import (
        PROMPT_CHARS_PER_TOKEN,
        ApiError,
        ChatRequest,
        CompletionRequest,
        SamplingRequest,
        ServeSettings,
        check_prompt_size,
        generation_error,
        parse,
    )
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("mlx-flash serve needs pydantic, starlette and uvicorn: "
                      "pip install 'mlx-flash[serve]'") from e


log = logging.getLogger("mlx_flash.server")


@dataclass
class Job:
    """One generation, as the worker runs it."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Outcome:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string), "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    flash: dict | None = None  # per-request flash totals (None for a dense model)


def prefix_function(s: str) -> list[int]:
    """KMP's table: [i] is the length of the longest proper prefix of s[:i + 1] that ends it."""
    table, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = table[k - 1]
        k += s[i] == s[k]
        table[i] = k
    return table


class StopStrings:
    """Cuts streamed text at the first stop string, holding back what may be one's start.

    Each stop string has a KMP matcher that reads the text once, as it arrives: a piece of n
    characters costs O(n) per stop string (amortized), however long the stops or the text so
    far, and what is held back is under the longest stop's length.
    """

    def __init__(self, stops: list[str]):
        self.stops, self.pending = stops, ""
        self._tables = [prefix_function(s) for s in stops]
        self._matched = [0] * len(stops)  # per stop: the longest prefix of it the text ends with
        self.steps = 0  # matcher steps so far (they grow linearly with the text)

    def _advance(self, i: int, text: str) -> int | None:
        """Run stop i's matcher over `text`: the index in it where the stop ends, if it does."""
        stop, table, k = self.stops[i], self._tables[i], self._matched[i]
        for j, char in enumerate(text):
            while k and stop[k] != char:
                k = table[k - 1]
                self.steps += 1
            k += stop[k] == char
            self.steps += 1
            if k == len(stop):
                return j
        self._matched[i] = k
        return None

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached). The stop is not emitted."""
        buf, base = self.pending + text, len(self.pending)
        starts = [base + end + 1 - len(s) for i, s in enumerate(self.stops)
                  if (end := self._advance(i, text)) is not None]
        if starts:
            self.flush()
            return buf[: min(starts)], True
        hold = max(self._matched, default=0)
        self.pending = buf[len(buf) - hold:]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """What was held back; the matchers start over."""
        out, self.pending = self.pending, ""
        self._matched = [0] * len(self.stops)
        return out


def flash_summary(model) -> dict | None:
    """Flash totals of the request just run (stats are reset per request)."""
    stats = getattr(getattr(model, "flash", None), "stats", None)
    if stats is None:
        return None
    totals = stats.totals()
    keys = ("decode_tokens", "bytes_read_per_token", "reads_per_token", "hit_rate",
            "peak_rss_bytes")
    return {k: totals[k] for k in keys}


def run_job(model, tokenizer, job: Job, emit: Callable[[str], None]) -> Outcome:
    """Generate on the calling thread, calling `emit(text)` per new piece of text."""

    stats = getattr(getattr(model, "flash", None), "stats", None)
    if stats is not None:
        stats.reset()  # per-request totals; a long-running server must not grow the step list
    if job.cancel.is_set():  # the client left while queued
        return Outcome("", "cancelled", len(job.prompt_ids), 0)
    if job.seed is not None:
        mx.random.seed(job.seed)
    sampler = make_sampler(temp=job.temperature, top_p=job.top_p)
    stops, pieces, reason, tokens = StopStrings(job.stop), [], "length", 0
    for response in stream_generate(model, tokenizer, job.prompt_ids, max_tokens=job.max_tokens,
                                    sampler=sampler):
        tokens = response.generation_tokens
        piece, stopped = stops.feed(response.text)
        if piece:
            pieces.append(piece)
            emit(piece)
        if stopped or job.cancel.is_set():
            reason = "stop" if stopped else "cancelled"
            break
        reason = response.finish_reason or reason
    else:
        if rest := stops.flush():
            pieces.append(rest)
            emit(rest)
    return Outcome("".join(pieces), reason, len(job.prompt_ids), tokens, flash_summary(model))


class QueueFull(Exception):
    pass


class ModelWorker:
    """Runs jobs one at a time on one thread, with at most `max_queue` waiting."""

    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-flash-model")
        self._lock = threading.Lock()
        self._cancels: set[threading.Event] = set()
        self._pending = 0  # running + waiting
        self.served = self.cancelled = self.failed = 0

    def submit(self, fn: Callable[[], object], cancel: threading.Event | None = None) -> Future:
        """Queue `fn` (QueueFull when the queue is at its bound); `cancel` is set on close."""
        cancel = cancel or threading.Event()
        with self._lock:
            if self._pending > self.max_queue:
                raise QueueFull(f"{self._pending} requests are running or waiting")
            self._pending += 1
            self._cancels.add(cancel)

        def run():
            try:
                return fn()
            except Exception:  # the request gets the error; the worker serves the next one
                log.exception("generation failed")
                with self._lock:
                    self.failed += 1
                raise
            finally:
                with self._lock:
                    self._pending -= 1
                    self._cancels.discard(cancel)
                    self.served += 1
                    self.cancelled += cancel.is_set()

        return self._executor.submit(run)

    def load(self) -> dict:
        with self._lock:
            return {"running": min(1, self._pending), "waiting": max(0, self._pending - 1),
                    "max_queue": self.max_queue, "served": self.served,
                    "cancelled": self.cancelled, "failed": self.failed}

    def close(self) -> None:
        """Stop the running generation at its next token, drop the waiting ones, and wait
        for the worker (so the model can be closed after this)."""
        with self._lock:
            for cancel in self._cancels:
                cancel.set()
        self._executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class Reply:
    """What every body of one response carries."""

    kind: Literal["chat", "completion"]
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, outcome: Outcome) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text},
                      "logprobs": None, "finish_reason": outcome.finish_reason}
        else:
            choice = {"index": 0, "text": outcome.text, "logprobs": None,
                      "finish_reason": outcome.finish_reason}
        body = self._head("chat.completion" if self.kind == "chat" else "text_completion")
        body.update(choices=[choice], usage=usage(outcome))
        if outcome.flash is not None:
            body["flash"] = outcome.flash
        return body

    def chunk(self, text: str | None = None, finish: str | None = None,
              role: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        body = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body["choices"] = [choice]
        return body

    def usage_chunk(self, outcome: Outcome) -> dict:
        body = self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion")
        body.update(choices=[], usage=usage(outcome))
        if outcome.flash is not None:
            body["flash"] = outcome.flash
        return body


def usage(outcome: Outcome) -> dict:
    return {"prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def sse(data: dict | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


@dataclass
class ServerState:
    model: object
    tokenizer: object
    settings: ServeSettings
    worker: ModelWorker
    # Chat templates and encoding run here, off the event loop, one at a time (so the tokenizer
    # never encodes on two threads at once). They are pure Python / Rust: no MLX arrays.
    tokenize_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max_workers=1, thread_name_prefix="mlx-flash-tokenize"))

    def vocab_size(self) -> int | None:
        return getattr(getattr(self.model, "args", None), "vocab_size", None)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (before reading it when declared)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; this server takes at most "
                            f"{limit} (--max-body-bytes)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, the most this server "
                                "takes (--max-body-bytes)", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def make_job(state: ServerState, req: SamplingRequest, ids: list[int],
             max_tokens: int | None) -> Job:
    """A Job from a validated request, its prompt within the context the server allows."""
    limit = state.settings.max_context
    if not ids:
        raise ApiError(400, "the prompt is empty (it has no tokens)", param="prompt")
    if len(ids) >= limit:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context is {limit} "
                            "(--max-kv-tokens): shorten the prompt",
                       code="context_length_exceeded")
    room = limit - len(ids)
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is "
                            f"over this server's context of {limit} tokens (--max-kv-tokens): "
                            f"ask for at most {room}", param="max_tokens",
                       code="context_length_exceeded")
    s = state.settings
    return Job(ids, max_tokens or min(s.max_tokens, room),
               s.temperature if req.temperature is None else req.temperature,
               s.top_p if req.top_p is None else req.top_p, req.seed, req.stop or [])


def chat_job(state: ServerState, req: ChatRequest) -> Job:
    ids = conversation_ids(state.tokenizer, [m.as_dict() for m in req.messages])
    return make_job(state, req, ids, req.max_completion_tokens or req.max_tokens)


def completion_job(state: ServerState, req: CompletionRequest) -> Job:
    if isinstance(req.prompt, str):
        ids = list(state.tokenizer.encode(req.prompt))
    else:
        ids, vocab = req.prompt, state.vocab_size()
        if vocab is not None and any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return make_job(state, req, ids, req.max_tokens)


def submit(state: ServerState, job: Job, emit: Callable[[str], None]) -> Future:
    try:
        return state.worker.submit(partial(run_job, state.model, state.tokenizer, job, emit),
                                   job.cancel)
    except QueueFull as e:
        raise ApiError(503, f"the server is busy ({e}; the queue holds "
                            f"{state.worker.max_queue}, --max-queue): retry later",
                       code="queue_full", kind="server_error") from None


async def _disconnected(receive) -> None:
    """Returns when the client has gone (after the body was read, receive waits for that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def job_error(done: Future | asyncio.Future) -> ApiError | None:
    """The error answering a finished job's future (None when it has an Outcome)."""
    if done.cancelled():
        return generation_error(None, cancelled=True)
    return generation_error(done.exception())


async def respond_json(request: Request, state: ServerState, job: Job, reply: Reply) -> Response:
    result = asyncio.wrap_future(submit(state, job, lambda _: None))
    gone = asyncio.ensure_future(_disconnected(request.receive))
    await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    gone.cancel()
    if not result.done():  # nobody is waiting for the answer any more
        job.cancel.set()
        return Response(status_code=499)
    if error := job_error(result):
        raise error
    return JSONResponse(reply.full(result.result()))


class CancellingStream(StreamingResponse):
    """A StreamingResponse that stops its generation however the response ends."""

    def __init__(self, content, cancel: threading.Event, **kwargs):
        super().__init__(content, **kwargs)
        self._cancel = cancel

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # finished, or the client disconnected (the stream task was cancelled)
            self._cancel.set()


def respond_stream(state: ServerState, job: Job, reply: Reply,
                   include_usage: bool) -> CancellingStream:
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def post(item) -> None:  # from the worker thread
        try:
            loop.call_soon_threadsafe(pieces.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown)
            job.cancel.set()

    future = submit(state, job, post)  # QueueFull -> 503 before any byte is sent
    future.add_done_callback(post)

    async def events() -> AsyncIterator[bytes]:
        if reply.kind == "chat":
            yield sse(reply.chunk(role=True))
        while not isinstance(item := await pieces.get(), Future):
            yield sse(reply.chunk(text=item))
        if error := job_error(item):  # an error event, then the end of the stream as always
            yield sse(error.body())
            yield sse("[DONE]")
            return
        outcome = item.result()
        yield sse(reply.chunk(finish=outcome.finish_reason))
        if include_usage:
            yield sse(reply.usage_chunk(outcome))
        yield sse("[DONE]")

    return CancellingStream(events(), job.cancel, media_type="text/event-stream",
                            headers={"Cache-Control": "no-cache"})


async def _complete(request: Request, kind: Literal["chat", "completion"]) -> Response:
    state: ServerState = request.app.state.flash
    body = await read_body(request, state.settings.max_body_bytes)
    req = parse(ChatRequest if kind == "chat" else CompletionRequest, body, state.settings)
    check_prompt_size(state.settings, req)
    to_job = chat_job if kind == "chat" else completion_job
    job = await asyncio.get_running_loop().run_in_executor(state.tokenize_pool,
                                                           partial(to_job, state, req))
    reply = Reply(kind, state.settings.model_id)
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        return respond_stream(state, job, reply, include)
    return await respond_json(request, state, job, reply)


def _model_card(state: ServerState) -> dict:
    return {"id": state.settings.model_id, "object": "model", "created": 0,
            "owned_by": "mlx-flash"}


def materialize(model) -> None:
    """Evaluate every array the model holds, on the calling thread.

    MLX streams belong to threads: an array still lazy on the loading thread (the neuron
    caches' zeroed buffers) cannot be evaluated later on the worker thread.
    """

    arrays = [model.parameters()]
    for layer in getattr(model, "layers", []):
        cache = getattr(getattr(layer, "mlp", None), "cache", None)
        if cache is not None:
            arrays.extend(cache.buffers.values())
    mx.eval(arrays)  # now, on the thread that built them


def create_app(model, tokenizer, settings: ServeSettings) -> Starlette:
    """The Starlette app serving `model`; `app.state.flash` is its ServerState.

    Call it on the thread that loaded the model (it evaluates the model's lazy arrays there).
    """
    materialize(model)
    state = ServerState(model, tokenizer, settings, ModelWorker(settings.max_queue))

    async def models(request):
        return JSONResponse({"object": "list", "data": [_model_card(state)]})

    async def one_model(request):
        if request.path_params["name"] != settings.model_id:
            raise ApiError(404, f"model '{request.path_params['name']}' is not served here; "
                                f"this server serves '{settings.model_id}'",
                           code="model_not_found")
        return JSONResponse(_model_card(state))

    async def health(request):
        return JSONResponse({"status": "ok", "model": settings.model_id,
                             **state.worker.load()})

    async def api_error(request, exc: ApiError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    async def http_error(request, exc: HTTPException):
        return JSONResponse(ApiError(exc.status_code, f"{request.method} {request.url.path}: "
                                                      f"{exc.detail}").body(),
                            status_code=exc.status_code)

    async def server_error(request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(ApiError(500, f"internal error: {exc}", kind="server_error").body(),
                            status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.worker.close()
        state.tokenize_pool.shutdown(wait=True, cancel_futures=True)

    routes = [Route("/v1/chat/completions", partial(_complete, kind="chat"), methods=["POST"]),
              Route("/v1/completions", partial(_complete, kind="completion"), methods=["POST"]),
              Route("/v1/models", models), Route("/v1/models/{name:path}", one_model),
              Route("/health", health)]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={ApiError: api_error, HTTPException: http_error,
                                        Exception: server_error})
    app.state.flash = state
    return app


def model_id_for(path: Path) -> str:
    """The served name: the model's folder (its parent when the dir is called `flash`)."""
    path = path.resolve()
    return path.parent.name if path.name == "flash" else path.name


def serve(model, tokenizer, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8080,
          log_level: str = "info") -> None:
    """Serve until interrupted (uvicorn handles SIGINT/SIGTERM with a graceful shutdown)."""
    import uvicorn  # optional dependency: the serve extra (imported when serving starts)

    uvicorn.run(create_app(model, tokenizer, settings), host=host, port=port,
                log_level=log_level, timeout_graceful_shutdown=5)


def cmd_serve(args: argparse.Namespace) -> int:
    """`mlx-flash serve`: load the model, then serve it."""
    path = model_dir(args)
    args.model = str(path)
    settings = ServeSettings(
        args.model_id or model_id_for(path), max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes, max_context=args.max_kv_tokens,
        max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p,
        max_stop_chars=args.max_stop_chars, max_prompt_chars=args.max_prompt_chars)
    print(f"loading {path} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(args)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: anyone who can reach this address can use the "
              "model (there is no authentication)", file=sys.stderr)
    print(f"serving {settings.model_id} at http://{args.host}:{args.port}/v1 - one request at "
          f"a time, up to {settings.max_queue} waiting (503 beyond)", file=sys.stderr)
    try:
        serve(model, tokenizer, settings, args.host, args.port, args.log_level)
    finally:
        if hasattr(model, "flash"):
            model.flash.close()
    return 0


def add_arguments(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on the `mlx-flash` subparsers; returns its parser."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions"
                                            ", /v1/completions, /v1/models)")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-id", default=None,
                   help="name served in /v1/models (default: the model's folder name)")
    p.add_argument("--max-queue", type=int, default=8,
                   help="requests that may wait behind the running one; more get 503")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted (413 beyond)")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="longest prompt text accepted, checked before tokenizing (400 beyond; "
                        f"default {PROMPT_CHARS_PER_TOKEN} x --max-kv-tokens)")
    p.add_argument("--max-stop-chars", type=int, default=256,
                   help="longest stop string accepted (400 beyond)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="completion tokens when a request does not set max_tokens")
    p.add_argument("--temp", type=float, default=0.0,
                   help="temperature when a request does not set one")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="top_p when a request does not set one")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p
