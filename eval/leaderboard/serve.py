"""Serve a built board directory over HTTP with the standard library (read-only, static files only)."""
from __future__ import annotations

import functools
import logging
import os
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)


class _QuietHandler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript",
                      ".json": "application/json", ".css": "text/css"}

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature of the base class
        logger.debug("%s - %s", self.address_string(), format % args)


def make_server(site_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server for ``site_dir`` (port 0 picks a free port; read ``server.server_address``)."""
    handler = functools.partial(_QuietHandler, directory=os.fspath(site_dir))
    return ThreadingHTTPServer((host, port), handler)


def serve_forever(site_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``site_dir`` until interrupted."""
    server = make_server(site_dir, host, port)
    logger.info("serving %s on http://%s:%d/", site_dir, *server.server_address[:2])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
