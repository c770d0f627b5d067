"""Serve the board with a real ASGI server: Starlette static files behind uvicorn, hardened.

- uvicorn (asyncio, no thread per connection) with a listen backlog of 2048, a cap on concurrent connections,
  a 5 s keep-alive timeout and a request-head timeout: a client that opens a connection and never finishes its
  request line and headers is disconnected after ``HEAD_TIMEOUT_S`` (uvicorn alone would keep it forever);
- a cap per client address (``MAX_CONNECTIONS_PER_CLIENT``): one more connection from an address that already
  holds that many is closed at once, so no single client can fill the server's ``LIMIT_CONCURRENCY`` slots with
  half-open connections (uvicorn would answer 503 to everyone until the head timeout). Behind a reverse proxy
  every visitor shares the proxy's address: raise the cap or turn it off (0) there; the proxy bears the flood;
- static files only, no directory listing (a folder answers 404 unless it holds ``index.html``), bad paths
  (``/%00``, ``..``) answer 4xx instead of dropping the connection;
- security headers on every response (:data:`SECURITY_HEADERS`).

``make_app(site_dir)`` is the ASGI app; ``start_server(app)`` runs it in a background thread (tests, load test);
``serve_forever(site_dir)`` is ``python -m eval.leaderboard serve``. The Gradio Space (``space.py``) is served by
the same ``uvicorn_config``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 5.0
KEEP_ALIVE_S = 5
BACKLOG = 2048
LIMIT_CONCURRENCY = 1000
#: Open connections one client address may hold (a browser opens about six per site).
MAX_CONNECTIONS_PER_CLIENT = 64
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "strict-origin-when-cross-origin",
    "cross-origin-opener-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=()",
    # The board is plain files: own scripts and styles only. Spaces embed apps in an iframe on huggingface.co.
    "content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'self' https://huggingface.co https://*.hf.space",
}


def _head_timeout_protocol(per_client: int = MAX_CONNECTIONS_PER_CLIENT) -> type:
    """uvicorn's h11 protocol with a timeout on receiving a request head and a cap on connections per client
    address (``per_client``; 0: no cap)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadTimeoutProtocol(H11Protocol):
        head_timeout = HEAD_TIMEOUT_S
        max_per_client = per_client
        _peer: str | None = None

        def _arm_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timeout)

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_timer()
            peer = transport.get_extra_info("peername")
            self._peer = peer[0] if isinstance(peer, (tuple, list)) and peer else None
            if self._peer is None or not self.max_per_client:
                return
            # one count per address, shared by every connection of this server (its ServerState)
            counts = self.server_state.__dict__.setdefault("sake_connections_per_client", {})
            counts[self._peer] = counts.get(self._peer, 0) + 1
            if counts[self._peer] > self.max_per_client:
                logger.debug("closing a connection from %s: it holds %d already", self._peer, self.max_per_client)
                transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._head_timer.cancel()
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_timer.cancel()
            counts = self.server_state.__dict__.get("sake_connections_per_client")
            if counts is not None and self._peer in counts:
                counts[self._peer] -= 1
                if counts[self._peer] <= 0:
                    del counts[self._peer]
            super().connection_lost(exc)

        def _head_timeout(self) -> None:
            waiting_for_head = self.cycle is None or self.cycle.response_complete
            if waiting_for_head and not self.transport.is_closing():
                logger.debug("closing a connection that sent no complete request in %.0f s", self.head_timeout)
                self.transport.close()

    return HeadTimeoutProtocol


class SecurityHeaders:
    """ASGI middleware adding :data:`SECURITY_HEADERS` (``headers`` overrides) to every HTTP response."""

    def __init__(self, app: Any, headers: dict[str, str] | None = None):
        self.app = app
        self.headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or SECURITY_HEADERS).items()]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message = dict(message, headers=list(message.get("headers", [])) +
                               [(k, v) for k, v in self.headers if k not in present])
            await send(message)

        await self.app(scope, receive, send_with_headers)


def static_app(site_dir: str | os.PathLike) -> Any:
    """A Starlette app serving ``site_dir`` (no listing; ``/`` serves ``index.html``)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount
    from starlette.staticfiles import StaticFiles

    return Starlette(routes=[Mount("/", app=StaticFiles(directory=os.fspath(site_dir), html=True))])


def make_app(site_dir: str | os.PathLike) -> Any:
    """The board's ASGI app: static files of ``site_dir`` with security headers."""
    return SecurityHeaders(static_app(site_dir))


def uvicorn_config(app: Any, host: str = "127.0.0.1", port: int = 8000,
                   per_client: int = MAX_CONNECTIONS_PER_CLIENT, **overrides: Any) -> Any:
    """The hardened uvicorn configuration shared by the static board and the Space (``per_client``: most open
    connections of one client address, 0 for no cap)."""
    import uvicorn

    options: dict[str, Any] = dict(host=host, port=port, http=_head_timeout_protocol(per_client), backlog=BACKLOG,
                   limit_concurrency=LIMIT_CONCURRENCY, timeout_keep_alive=KEEP_ALIVE_S,
                   timeout_graceful_shutdown=5, server_header=False, log_level="warning", lifespan="auto")
    options.update(overrides)
    return uvicorn.Config(app, **options)


@dataclass
class RunningServer:
    """A uvicorn server running in a daemon thread; ``url`` ends without a slash."""

    server: Any
    thread: threading.Thread
    url: str

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_server(app: Any, host: str = "127.0.0.1", port: int = 0, **overrides: Any) -> RunningServer:
    """Run ``app`` in a background thread (port 0: a free port) and wait until it accepts connections."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn_config(app, host, sock.getsockname()[1], **overrides))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the board server did not start")
        time.sleep(0.02)
    return RunningServer(server, thread, f"http://{host}:{sock.getsockname()[1]}")


def serve_forever(site_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``site_dir`` until interrupted."""
    import uvicorn

    logger.info("serving %s on http://%s:%d/", site_dir, host, port)
    uvicorn.Server(uvicorn_config(make_app(site_dir), host, port)).run()
