"""OpenAI-compatible HTTP API (FastAPI) over one bounded-KV model.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions.
Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pymorph_edge import __version__
from pymorph_edge.generation.generation_record import GenerationCancelled
from pymorph_edge.generation.sampling import SamplingParams
from pymorph_edge.llama import Llama
from pymorph_edge.server.conversations import ConversationStore
from pymorph_edge.server.schemas import ChatRequest, CompletionRequest, EmbeddingRequest
from pymorph_edge.server.worker import ModelWorker, QueueFull, RequestControl

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    err_type: str = "invalid_request_error",
) -> JSONResponse:
    return JSONResponse(
        status_code=status, content={"error": {"message": message, "type": err_type, "param": param, "code": code}}
    )


# A client still sending when the server closes gets a TCP reset instead of the 413 (the kernel resets a socket
# closed with unread data), so the rest of an oversized body is read and discarded first, up to these bounds.
DRAIN_MAX_BYTES = 64 << 20
DRAIN_TIMEOUT_S = 30.0


async def drain_body(receive: Receive, max_bytes: int = DRAIN_MAX_BYTES, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Read and discard the request body until it ends, max_bytes were read, the client left, or timeout_s."""

    async def read_all() -> None:
        read = 0
        while read <= max_bytes:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # http.disconnect
            read += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return

    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(read_all(), timeout_s)


class BodyLimit:
    """Refuse request bodies over max_bytes with 413, whether or not Content-Length is sent. The body is drained
    before the answer (see DRAIN_MAX_BYTES), so a client that is still sending reads the 413, not a reset."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, message: str) -> None:
        await drain_body(receive)
        response = error_response(413, message, code="body_too_large")
        response.headers["connection"] = "close"
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(
                scope, receive, send, f"request body of {int(declared)} bytes exceeds the {self.max_bytes}-byte limit"
            )
        seen = 0
        ended = exceeded = False

        async def limited() -> Message:
            nonlocal seen, ended, exceeded
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                ended = not msg.get("more_body", False)
                if seen > self.max_bytes:
                    exceeded = True
                    raise _TooLarge()
            return msg

        async def guarded(msg: Message) -> None:
            # FastAPI turns an error while reading the body into its own 400; the 413 below replaces it
            if not exceeded:
                await send(msg)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, limited, guarded)
        if exceeded:
            rest: Receive = receive
            if ended:  # the whole body is read already: nothing left to drain

                async def rest() -> Message:
                    return {"type": "http.request", "body": b"", "more_body": False}

            await self._refuse(scope, rest, send, f"request body exceeds the {self.max_bytes}-byte limit")


class _TooLarge(Exception):
    pass


class ApiKeyCheck:
    """Every request, /health included, needs 'Authorization: Bearer KEY'. A plain ASGI wrapper rather than
    FastAPI's @app.middleware("http"): that one hides http.disconnect from request.is_disconnected(), and
    a non-streaming request relies on it to stop when its client hangs up (measured with Starlette 1.10)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(auth, self.expected):
                return await error_response(
                    401,
                    "missing or wrong API key (send 'Authorization: Bearer <key>')",
                    err_type="authentication_error",
                    code="invalid_api_key",
                )(scope, receive, send)
        await self.app(scope, receive, send)


class ServedApp:
    """The ASGI app plus the handle a server process needs at shutdown: stop_generations() ends the
    running and queued requests at their next token (uvicorn waits for open requests before it exits)."""

    def __init__(self, app: ASGIApp, worker: ModelWorker) -> None:
        self.app, self.worker = app, worker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    def stop_generations(self) -> None:
        self.worker.stop_all("shutdown")


SAMPLING_FIELDS = tuple(k for k in SamplingParams.keywords() if k not in ("tfs_z",))


def sampling_kw(req: CompletionRequest | ChatRequest, max_tokens: int | None) -> dict[str, Any]:
    """The generation keywords both endpoints pass on to Llama: every sampling field the request model has
    (SamplingParams defines them once)."""
    kw = {k: getattr(req, k) for k in SAMPLING_FIELDS if k in type(req).model_fields}
    return {**kw, "max_tokens": max_tokens, "stop": req.stop}


def create_app(
    llm: Llama,
    *,
    api_key: str | None = None,
    max_queue: int = 8,
    max_tokens_limit: int = 8192,
    max_body_bytes: int = 1 << 20,
    request_timeout: float | None = 600.0,
    max_sessions: int = 4,
    session_dir: str | Path | None = None,
) -> ServedApp:
    """The FastAPI app wrapped in the request-body limit (an ASGI app: serve it with uvicorn or TestClient).

    max_tokens_limit: the most tokens one answer may have, and the bound of a request that sets none.
    request_timeout: seconds a request may run, queue time included (None: no limit); past it the
    generation stops and the client gets a 408.
    max_sessions: chat conversations kept, the one in the cache included; a request that continues any of
    them decodes only its new messages. session_dir: where least-recently-used ones go instead of being
    dropped."""
    if max_tokens_limit < 1:
        raise ValueError(f"max_tokens_limit must be >= 1, got {max_tokens_limit}")
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds or None, got {request_timeout}")
    worker = ModelWorker(max_queue)
    store = ConversationStore(llm, max_sessions, session_dir)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.shutdown()

    app = FastAPI(title="pymorph_edge", version=__version__, lifespan=lifespan)
    model_id = Path(llm.model_path).name
    app.state.worker = worker

    @app.exception_handler(RequestValidationError)
    async def on_validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = [str(x) for x in err.get("loc", []) if x != "body"]
        if err.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {err.get('msg')}", code="invalid_json")
        param = ".".join(loc) or None
        return error_response(400, f"{param or 'body'}: {err.get('msg')} (got {err.get('input')!r:.100})", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            exc.status_code,
            str(exc.detail),
            err_type="invalid_request_error" if exc.status_code < 500 else "server_error",
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_id,
            "busy": worker.busy,
            "queued": worker.queued,
            "sessions": {"kept": store.kept, "on_disk": store.on_disk, "bytes": store.bytes_kept()},
            "kv": llm.stats.as_dict(),
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "pymorph_edge"}],
        }

    def check_limits(max_tokens: int | None) -> JSONResponse | None:
        if max_tokens is not None and max_tokens > max_tokens_limit:
            return error_response(
                400, f"max_tokens={max_tokens} exceeds this server's limit of {max_tokens_limit}", param="max_tokens"
            )
        return None

    def cancelled_response(ctl: RequestControl) -> JSONResponse:
        if ctl.reason == "timeout":
            return error_response(
                408,
                f"the request ran past this server's --request-timeout of {request_timeout:g} s and was stopped",
                code="request_timeout",
            )
        if ctl.reason == "shutdown":
            return error_response(503, "the server is shutting down", err_type="server_error", code="shutting_down")
        return error_response(499, "the client closed the connection", code="client_closed")  # nobody reads it

    async def watch_disconnect(request: Request, ctl: RequestControl, task: asyncio.Future[Any]) -> None:
        """A non-streaming client that hangs up stops its generation (streams notice on their own)."""
        while not task.done():
            if await request.is_disconnected():
                ctl.stop("disconnect")
                return
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)

    async def respond(request: Request, make: Any, stream: bool, headers_of: Any) -> Any:
        try:
            ctl = worker.admit()
        except QueueFull as exc:
            return error_response(
                429, f"server busy: {exc}; retry later", err_type="rate_limit_error", code="queue_full"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(request_timeout, ctl.stop, "timeout") if request_timeout else None
        if not stream:
            # the headers are read on the model thread right after this answer, before the next request runs
            task = asyncio.ensure_future(worker.run(ctl, lambda: (make(False, ctl), headers_of())))
            watcher = asyncio.ensure_future(watch_disconnect(request, ctl, task))
            try:
                result, headers = await task
            except GenerationCancelled:
                return cancelled_response(ctl)
            except ValueError as exc:
                return error_response(400, str(exc))
            except Exception as exc:  # a failure inside llama.cpp: report it in OpenAI's shape, keep serving
                logger.exception("generation failed")
                return error_response(500, f"generation failed: {exc}", err_type="server_error")
            finally:
                watcher.cancel()
                if deadline is not None:
                    deadline.cancel()
            return JSONResponse(result, headers=headers)

        # pull the first chunk before answering, so bad parameters still get a 400 rather than a broken stream
        chunks = worker.stream(ctl, lambda: make(True, ctl))
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as exc:
            await chunks.aclose()
            if deadline is not None:
                deadline.cancel()
            if isinstance(exc, GenerationCancelled):
                return cancelled_response(ctl)
            if isinstance(exc, ValueError):
                return error_response(400, str(exc))
            logger.exception("generation failed")  # a failure inside llama.cpp before the first token
            return error_response(500, f"generation failed: {exc}", err_type="server_error")

        async def events() -> Any:
            try:
                if first is not None:
                    yield f"data: {json.dumps(first)}\n\n"
                    async for chunk in chunks:
                        yield f"data: {json.dumps(chunk)}\n\n"
            except Exception as exc:  # the stream has started, so an error event is the only way to report it
                if isinstance(exc, GenerationCancelled):
                    msg = json.loads(bytes(cancelled_response(ctl).body))["error"]
                else:
                    logger.exception("generation failed")
                    msg = {"message": str(exc), "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': msg})}\n\n"
            finally:
                await chunks.aclose()
                if deadline is not None:
                    deadline.cancel()
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers_of()}
        )

    def kv_headers() -> dict[str, str]:
        s = llm.stats
        return {"X-KV-Cells": str(s.cells_in_use), "X-KV-Evicted": str(s.tokens_evicted), "X-KV-Budget": str(s.budget)}

    def conversation_usage(source: str) -> dict[str, Any]:
        """Which kept conversation a chat request continued ("cache", "memory", "disk") or started ("new")."""
        return {"id": llm.conversation_id, "resumed_from": source}

    def with_usage(chunks: Iterator[dict[str, Any]], include: bool, extra: Any = None) -> Iterator[dict[str, Any]]:
        last = None
        for c in chunks:
            last = c
            yield c
        if include and last is not None:
            usage = llm.usage(llm.last_timings.prompt_tokens, llm.last_timings.completion_tokens)
            if extra is not None:
                usage["conversation"] = extra()
            yield {**last, "choices": [], "usage": usage}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        if (bad := check_limits(req.max_tokens)) is not None:
            return bad
        kw = sampling_kw(req, req.max_tokens or max_tokens_limit)  # null means as much as the server allows
        include = bool((req.stream_options or {}).get("include_usage"))

        def make(stream: bool, ctl: RequestControl) -> Any:
            store.stash_live()  # a plain completion replaces the cache: keep the conversation it held
            out = llm.create_completion(
                req.prompt, stream=stream, cancel=ctl, logprobs=req.logprobs, echo=req.echo, **kw
            )
            return with_usage(out, include) if stream else out

        return await respond(request, make, req.stream, kv_headers)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Any:
        max_tokens = req.max_completion_tokens or req.max_tokens
        if (bad := check_limits(max_tokens)) is not None:
            return bad
        msgs = [m.model_dump(exclude_none=True) for m in req.messages]
        structured = dict(
            response_format=req.response_format,
            tools=req.tools,
            tool_choice=req.tool_choice,
            functions=req.functions,
            function_call=req.function_call,
            logprobs=req.logprobs,
            top_logprobs=req.top_logprobs,
        )
        # no max_tokens: the server's limit, so a model that never ends its turn cannot hold the thread
        kw = sampling_kw(req, max_tokens or max_tokens_limit)
        include = bool((req.stream_options or {}).get("include_usage"))

        def make(stream: bool, ctl: RequestControl) -> Any:
            source = store.activate(msgs)
            out = llm.create_chat_completion(msgs, stream=stream, cancel=ctl, **structured, **kw)
            if stream:
                return with_usage(out, include, lambda: conversation_usage(source))
            out["usage"]["conversation"] = conversation_usage(source)
            return out

        return await respond(request, make, req.stream, kv_headers)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request) -> Any:
        if not llm._embedding:
            return error_response(
                400, "this server was started without --embedding, so it serves no embeddings", param="input"
            )
        return await respond(
            request, lambda _stream, _ctl: llm.create_embedding(req.input, model=req.model), False, dict
        )

    checked: ASGIApp = app if api_key is None else ApiKeyCheck(app, api_key)
    return ServedApp(BodyLimit(checked, max_body_bytes), worker)
