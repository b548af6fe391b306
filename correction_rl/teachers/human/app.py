"""The correction web app: annotators lease items from the queue, edit y, and save y'.

FastAPI (a maintained framework already installed with vLLM) serves one static page, its
script and stylesheet, and a small JSON API. Security choices (docs/human-teachers.md):

* **Loopback by default** — ``serve()`` binds 127.0.0.1 unless configured otherwise.
* **A token per annotator** on every API request (``Authorization: Bearer``). The page reads it
  from the URL fragment (``/#token=...``, never sent to the server or its logs) into
  ``sessionStorage``. The static shell (HTML/JS/CSS) carries no data, so it is public.
* **Text, never HTML** — item text only travels as JSON and the script puts it into the page
  with ``textContent``/``value``; a Content-Security-Policy forbids inline scripts besides, so
  even a mistake could not run a ``<script>`` from a model response.
* **Cross-site requests refused** — state-changing requests (POST) need the custom header
  ``X-CRL-Request: 1`` (a cross-site form cannot set it, and a cross-site ``fetch`` with it needs
  a CORS preflight we never grant) and, when the browser sends ``Origin``, the server's own.
* **Bodies size-limited** — POSTs need a ``Content-Length`` no larger than ``max_body_bytes``.
"""

from __future__ import annotations

import hmac
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from correction_rl.errors import UserError
from correction_rl.teachers.human.queue import AlreadySaved, CorrectionQueue, QueueError

STATIC = Path(__file__).parent / "static"
CSRF_HEADER = "x-crl-request"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class TokenSpecError(ValueError, UserError):
    """The annotators' token variable is malformed; the message names the entry, never a token."""


def parse_tokens(spec: str) -> dict[str, str]:
    """``"alice=tok1,bob=tok2"`` -> ``{"tok1": "alice", "tok2": "bob"}``; errors name the entry."""
    tokens: dict[str, str] = {}
    for k, entry in enumerate(p.strip() for p in spec.split(",")):
        if not entry:
            continue
        name, sep, token = entry.partition("=")
        if not sep or not name.strip() or not token.strip():
            raise TokenSpecError(f"annotator tokens: entry {k + 1} {name.strip() or entry!r}: expected name=token")
        if len(token.strip()) < 16:
            raise TokenSpecError(f"annotator tokens: entry {k + 1} ({name.strip()}): token shorter than 16 characters")
        if token.strip() in tokens:
            raise TokenSpecError(f"annotator tokens: entry {k + 1} ({name.strip()}): token already used")
        tokens[token.strip()] = name.strip()
    if not tokens:
        raise TokenSpecError("annotator tokens: none configured (expected name=token[,name=token...])")
    return tokens


class _ItemRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: str = Field(max_length=64)


class _Submit(_ItemRef):
    corrected_text: str


class _Error(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message


def create_app(queue: CorrectionQueue, tokens: dict[str, str], max_body_bytes: int = 65536) -> FastAPI:
    """The ASGI app over ``queue``; ``tokens`` maps access token -> annotator name."""
    app = FastAPI(title="correction-rl human teacher", docs_url=None, redoc_url=None, openapi_url=None)

    def annotator(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise _Error(401, "access token required (Authorization: Bearer <token>)")
        found = None
        for token, name in tokens.items():  # compare against all: no early exit on a match
            if hmac.compare_digest(token.encode(), given.encode()):
                found = name
        if found is None:
            raise _Error(401, "unknown access token")
        return found

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            if request.method not in ("GET", "HEAD", "POST"):
                raise _Error(405, f"method {request.method} not allowed")
            if request.method == "POST":
                if request.headers.get(CSRF_HEADER) != "1":
                    raise _Error(403, f"cross-site request refused: missing header {CSRF_HEADER.title()}: 1")
                origin = request.headers.get("origin")
                own = f"{request.url.scheme}://{request.headers.get('host', '')}"
                if origin is not None and origin != own:
                    raise _Error(403, f"cross-site request refused: Origin {origin!r} is not {own!r}")
                length = request.headers.get("content-length")
                if length is None or not length.isdigit():
                    raise _Error(411, "Content-Length required")
                if int(length) > max_body_bytes:
                    raise _Error(413, f"request body {length} bytes > limit {max_body_bytes}")
            response = await call_next(request)
        except _Error as err:
            response = JSONResponse({"error": err.message}, status_code=err.status)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(_Error)
    async def on_error(request: Request, err: _Error):
        return JSONResponse({"error": err.message}, status_code=err.status)

    @app.exception_handler(QueueError)
    async def on_queue_error(request: Request, err: QueueError):
        return JSONResponse({"error": str(err)}, status_code=409)

    for name, media in (("index.html", "text/html"), ("app.js", "text/javascript"), ("app.css", "text/css")):
        def static(name: str = name, media: str = media) -> FileResponse:
            return FileResponse(STATIC / name, media_type=media)

        app.get("/" if name == "index.html" else f"/{name}", include_in_schema=False)(static)

    # Queue calls are blocking SQLite transactions: plain ``def`` endpoints run in FastAPI's
    # thread pool, so a slow disk never stalls the event loop.

    @app.get("/api/me")
    def me(request: Request) -> dict[str, Any]:
        who = annotator(request)
        return {"annotator": who, "progress": queue.progress(who), "lease_timeout_s": queue.lease_timeout_s}

    @app.post("/api/next")
    def next_item(request: Request) -> dict[str, Any]:
        who = annotator(request)
        item = queue.lease(who)
        return {"item": item.public() if item else None, "progress": queue.progress(who), "server_time": time.time()}

    @app.post("/api/renew")
    def renew(ref: _ItemRef, request: Request) -> dict[str, Any]:
        return {"lease_expires": queue.renew(ref.item_id, annotator(request))}

    @app.post("/api/submit")
    def submit(body: _Submit, request: Request) -> dict[str, Any]:
        who = annotator(request)
        try:
            item = queue.complete(body.item_id, who, body.corrected_text)  # committed before we answer
        except AlreadySaved as saved:  # a double-clicked Submit: the first click stored it
            if not saved.same_text:
                raise _Error(409, str(saved)) from None
            item = saved.item
            return {"saved": True, "already_saved": True, "item_id": item.item_id,
                    "edit_distance": item.edit_distance, "progress": queue.progress(who)}
        return {"saved": True, "item_id": item.item_id, "edit_distance": item.edit_distance,
                "progress": queue.progress(who)}

    @app.post("/api/skip")
    def skip(ref: _ItemRef, request: Request) -> dict[str, Any]:
        who = annotator(request)
        queue.skip(ref.item_id, who)
        return {"skipped": True, "progress": queue.progress(who)}

    return app


@dataclass
class Server:
    """A uvicorn server running the app in a background thread (``stop()`` to end it)."""

    server: Any
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 20.0) -> Server:
    """Starts uvicorn on ``host:port`` in a daemon thread; ``port=0`` picks a free port.

    Raises ``RuntimeError`` naming the address when the server is not up within the timeout
    (port taken, bad host)."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"human teacher app: cannot bind {host}:{port}: {exc}") from None
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="human-teacher-app", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"human teacher app did not start on {host}:{port} within {start_timeout_s}s")
        time.sleep(0.02)
    return Server(server, thread, host, port)
