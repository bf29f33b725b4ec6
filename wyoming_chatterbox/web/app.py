"""The HTTP side: one aiohttp application on the server's own event loop.

Routes and answers are those of docs/http-api.md: the page and its files, the
page's API (speak.py, voices_upload.py, the status and model routes here) and
OpenAI's (openai.py). Every request passes access.py's checks; every error is
JSON (errors.py); at most `--max-connections` requests run at once. Speech
goes through reply.py, the model's life through the EngineWorker; nothing
here blocks the loop. `HttpServer` is what server.py starts and stops.
"""

import asyncio
import logging
import os
import ssl
from pathlib import Path
from typing import Optional

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .. import __version__
from ..engine import LOAD, UNLOAD, EngineBusy
from ..reply import Replies
from ..settings import Settings
from ..speech import EngineError
from . import HttpStartError, openai, speak, voices_upload
from .access import SESSION_COOKIE, Access
from .errors import ApiError, json_errors
from .speak import read_json
from .state import STATE, WebState

_LOGGER = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
# A wrong token costs this long: guessing is slow (the cap on requests in
# progress bounds how many guesses run at once).
LOGIN_FAILURE_DELAY_S = 1.0


async def page(request: web.Request) -> web.StreamResponse:
    """GET /: the page (its files under /static)."""
    return web.FileResponse(
        STATIC / "index.html", headers={"Cache-Control": "no-cache"}
    )


async def health(request: web.Request) -> web.Response:
    """GET /health: 200 while the engine serves (the model loaded, or to be
    loaded again by the next request), else 503."""
    engine = request.app[STATE].engine
    if not engine.running:
        raise ApiError(503, "The speech engine is not running", "engine_stopped")
    return web.json_response({"status": "ok", "model_loaded": engine.model_loaded})


async def status(request: web.Request) -> web.Response:
    """GET /api/status: what the page's status panel shows."""
    state = request.app[STATE]
    engine, backend = state.engine, state.engine.backend
    gpu_memory = getattr(backend, "gpu_memory", None)
    used = gpu_memory() if gpu_memory is not None else None
    loaded = engine.loaded()
    models = [
        {
            "name": engine.models[key].model_name,
            "id": openai.model_id(engine.models[key].model_name),
            "loaded": loaded[key],
        }
        for key in engine.models
    ]
    return web.json_response(
        {
            "version": __version__,
            "device": backend.device,
            "models": models,
            "gpu_memory_bytes": int(used) if used is not None else None,
            "replies_in_progress": state.replies.active(),
            "queue_depth": engine.queue_depth(),
            "voices_dir_writable": voices_upload.can_upload(state),
            "token_required": state.access.token_required,
        }
    )


async def stop_all(request: web.Request) -> web.Response:
    """POST /api/stop: cancel every reply in progress, of every front end."""
    cancelled = request.app[STATE].replies.cancel_all()
    _LOGGER.info("Stop all: %s replies cancelled by an HTTP request", cancelled)
    return web.json_response({"cancelled": cancelled})


async def model_unload(request: web.Request) -> web.Response:
    """POST /api/model/unload: free the model now; 409 while replies run."""
    engine = request.app[STATE].engine
    try:
        await engine.model_request(UNLOAD)
    except EngineBusy as err:
        raise ApiError(409, str(err), "replies_in_progress") from None
    except EngineError as err:
        raise ApiError(503, str(err), "engine_stopped") from None
    return web.json_response({"loaded": engine.model_loaded})


async def model_load(request: web.Request) -> web.Response:
    """POST /api/model/load: load it again (returns once loaded)."""
    engine = request.app[STATE].engine
    try:
        await engine.model_request(LOAD)
    except EngineError as err:
        raise ApiError(503, str(err), "engine_stopped") from None
    except Exception as err:  # pylint: disable=broad-except
        raise ApiError(500, f"Loading the model failed: {err}", "load_failed") from None
    return web.json_response({"loaded": engine.model_loaded})


async def login(request: web.Request) -> web.Response:
    """POST /api/login {"token"}: the session cookie for the page."""
    state = request.app[STATE]
    access = state.access
    if not access.token_required:
        return web.json_response({"token_required": False})
    body = await read_json(request, 4096, state.idle)
    token = body.get("token")
    if not isinstance(token, str) or not access.token_matches(token):
        await asyncio.sleep(LOGIN_FAILURE_DELAY_S)
        raise ApiError(401, "Wrong token", "invalid_token")
    response = web.json_response({"token_required": True})
    access.set_session(response)
    return response


async def logout(request: web.Request) -> web.Response:
    """POST /api/logout: forget the session cookie."""
    response = web.Response(status=204)
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


def request_cap(limit: Optional[int]) -> Middleware:
    """Middleware: at most `limit` requests in progress (--max-connections)."""
    running = 0

    @web.middleware
    async def cap(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal running
        if limit is not None and running >= limit:
            raise ApiError(
                503,
                f"The server is busy: {limit} requests are in progress "
                "(--max-connections)",
                "too_many_requests",
            )
        running += 1
        try:
            return await handler(request)
        finally:
            running -= 1

    return cap


def make_app(replies: Replies, settings: Settings) -> web.Application:
    """The application: state, checks and routes."""
    access = Access(settings.http, tls=settings.http.http_cert is not None)
    state = WebState(replies, settings, access)
    app = web.Application(
        middlewares=[
            json_errors,
            request_cap(settings.server.max_connections),
            access.middleware(),
        ],
        # Bodies are read in pieces with their own caps (speak.read_json,
        # voices_upload); this is aiohttp's own for request.read()/post().
        client_max_size=state.body_cap,
    )
    app[STATE] = state
    app.on_response_prepare.append(access.on_prepare)
    add = app.router
    add.add_get("/", page)
    add.add_static("/static", STATIC, follow_symlinks=False)
    add.add_get("/health", health)
    add.add_get("/api/status", status)
    add.add_post("/api/speak", speak.speak_events)
    add.add_post("/api/speak.wav", speak.speak_wav)
    add.add_post("/api/stop", stop_all)
    add.add_post("/api/model/unload", model_unload)
    add.add_post("/api/model/load", model_load)
    add.add_get("/api/voices", voices_upload.list_voices)
    add.add_post("/api/voices", voices_upload.upload)
    add.add_get("/api/voices/{name}/clip", voices_upload.clip)
    add.add_delete("/api/voices/{name}", voices_upload.delete)
    add.add_post("/api/login", login)
    add.add_post("/api/logout", logout)
    add.add_post("/v1/audio/speech", openai.speech)
    add.add_get("/v1/audio/voices", openai.voices)
    add.add_get("/v1/models", openai.models)
    return app


def tls_context(settings: Settings) -> Optional[ssl.SSLContext]:
    """HTTPS from --http-cert/--http-key; HttpStartError if they do not load."""
    http = settings.http
    if http.http_cert is None or http.http_key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(http.http_cert, http.http_key)
    except (OSError, ssl.SSLError) as err:
        raise HttpStartError(
            f"--http-cert {http.http_cert} / --http-key {http.http_key}: cannot "
            f"load them ({_reason(err)})"
        ) from None
    return context


def _reason(err: OSError) -> str:
    """ "Address already in use", not asyncio's sentence around it."""
    if isinstance(err, ssl.SSLError) or not err.errno:
        return str(err)
    return os.strerror(err.errno)


class HttpServer:
    """The page and the HTTP API, served until stop()."""

    def __init__(self, replies: Replies, settings: Settings) -> None:
        self.settings = settings
        self.app = make_app(replies, settings)
        self._runner: Optional[web.AppRunner] = None
        self.port: Optional[int] = settings.http.http_port
        self._tls = tls_context(settings)

    @property
    def url(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        host = self.settings.http.http_host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}/"

    async def start(self) -> None:
        """Listen; HttpStartError (port taken, bad address) if it cannot."""
        http = self.settings.http
        server = self.settings.server
        runner = web.AppRunner(
            self.app,
            # A closed request cancels its handler, hence its reply.
            handler_cancellation=True,
            keepalive_timeout=server.idle_timeout or 75.0,
            shutdown_timeout=server.shutdown_grace,
        )
        await runner.setup()
        site = web.TCPSite(
            runner, http.http_host, http.http_port, ssl_context=self._tls
        )
        try:
            await site.start()
        except OSError as err:
            await runner.cleanup()
            raise HttpStartError(
                f"--http-port {http.http_port} on {http.http_host}: {_reason(err)}"
            ) from None
        self._runner = runner
        if not self.port:  # port 0 (tests): the one the system chose
            self.port = runner.addresses[0][1]
        _LOGGER.info("Web page and HTTP API on %s", self.url)

    async def stop(self) -> None:
        """Stop listening; requests in progress get the shutdown grace."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
