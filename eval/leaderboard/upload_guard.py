"""The guard of a Gradio app on a public server: it may open only files its own upload route received.

A Gradio call names files by path (``{"path": ...}``); Gradio checks such paths itself only for an app it launches,
not for one mounted with ``mount_gradio_app``, and it copies a named file into its cache before the app's function
sees it. :class:`UploadsOnly`, ASGI middleware in front of the app, refuses every call naming a file that is not an
upload (:func:`check_upload`) before Gradio copies, reads or serves anything, and lets :class:`UploadGate` limit
the upload route itself (uploads per client address, the upload folder's size, uploads deleted after a while).

Used by the leaderboard Space (``eval/leaderboard/space.py``) and the metric Space (``eval/metric_space.py``, which
ships this file beside its ``app.py``): standard library only.
"""
from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Collection

logger = logging.getLogger(__name__)

#: Gradio's route that receives uploads (multipart); every other POST body is JSON and is checked for file paths.
UPLOAD_ROUTE = "/gradio_api/upload"
#: Largest JSON body of an API call (a call names files by path; the files themselves go to the upload route).
MAX_API_BODY = 1 << 20
_REMOTE_FILE = re.compile(r"/file=\s*[a-z][a-z0-9+.-]*:", re.IGNORECASE)


class UploadRefused(ValueError):
    """A file named in a request is not a file this Space received as an upload; the message names no path."""


def gradio_upload_dir() -> str:
    """The folder Gradio writes uploads to: ``GRADIO_TEMP_DIR``, else ``<temp dir>/gradio`` (Gradio's rule)."""
    return os.environ.get("GRADIO_TEMP_DIR") or str((Path(tempfile.gettempdir()) / "gradio").resolve())


def check_upload(path: Any, upload_dir: str | os.PathLike, max_bytes: int,
                 received: Collection[str] | None = None) -> Path:
    """``path`` as a file this Space received, checked without opening it; :class:`UploadRefused` otherwise.

    Accepted only when it is a string naming a regular file (not a link, FIFO, device or folder) of at most
    ``max_bytes`` inside ``upload_dir`` after resolving links, and (given ``received``, the paths Gradio's upload
    route returned) one of those paths.
    """
    refused = UploadRefused("not a file uploaded to this Space: upload the file with the page's form (or the "
                            "upload route) and name that")
    if not isinstance(path, (str, os.PathLike)):
        raise refused
    text = os.fspath(path)
    if not text or "\0" in text or (received is not None and text not in received):
        raise refused
    root = os.path.realpath(upload_dir)
    real = os.path.realpath(text)
    if real == root or os.path.commonpath([root, real]) != root:
        raise refused
    try:
        info = os.lstat(text)
    except OSError:
        raise UploadRefused("the uploaded file is no longer on the server; upload it again") from None
    if not stat.S_ISREG(info.st_mode):
        raise refused
    if info.st_size > max_bytes:
        raise UploadRefused(f"the upload is {info.st_size} bytes, over the limit of {max_bytes} bytes")
    return Path(text)


class UploadGate:
    """What Gradio's upload route admits, so that uploads cannot fill the Space's disk.

    At most ``per_hour`` upload requests from one client (an IPv4 address, or an IPv6 /64 network) in any hour (0:
    no limit); each request may carry at most ``max_request_bytes`` of body and none may take the upload folder past
    ``max_dir_bytes``: the bytes are counted as they arrive (a declared length is not trusted, a chunked body has
    none), and a body past its allowance is cut off (the app sees the client disconnect; nothing is stored).
    Uploads older than ``ttl_s`` are deleted (the app may delete one sooner, once read) by a sweep that runs in a
    thread at most every ``sweep_s``; it also forgets, in ``received`` (the app's set of uploaded paths, when
    given), the paths it finds gone."""

    def __init__(self, upload_dir: str | os.PathLike, per_hour: int, ttl_s: float, max_dir_bytes: int,
                 max_request_bytes: int | None = None, sweep_s: float = 60.0, received: Any = None):
        self.upload_dir = Path(upload_dir)
        self.per_hour = per_hour
        self.ttl_s = ttl_s
        self.max_dir_bytes = max_dir_bytes
        self.max_request_bytes = max_dir_bytes if max_request_bytes is None else max_request_bytes
        self.sweep_s = sweep_s
        self.received = received
        self._recent: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()
        self._swept_at = -math.inf
        self._sweeping = False
        self._dir_bytes = 0

    @staticmethod
    def client_key(scope: dict) -> str:
        """The client an ASGI request counts against: its address, an IPv6 one by its /64 network."""
        host = str((scope.get("client") or ("?",))[0])
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(host)
            if address.version == 6 and not address.ipv4_mapped:
                return str(ipaddress.ip_network(f"{host}/64", strict=False))
        return host

    def admit(self, client: str, declared_bytes: int = 0) -> str | None:
        """Why an upload request from ``client`` (declaring ``declared_bytes``, 0 when it declares none) is refused,
        or None (it is then counted against the client's hourly number)."""
        now = time.monotonic()
        with self._lock:
            if now - self._swept_at >= self.sweep_s and not self._sweeping:
                self._swept_at, self._sweeping = now, True
                threading.Thread(target=self._sweep_in_thread, name="upload-sweep", daemon=True).start()
            if self.per_hour:
                recent = self._recent.setdefault(client, collections.deque())
                while recent and now - recent[0] >= 3600:
                    recent.popleft()
                if len(recent) >= self.per_hour:
                    return f"too many uploads from this address: at most {self.per_hour} an hour; try again later"
            if declared_bytes > self.max_request_bytes:
                return f"an upload of at most {self.max_request_bytes} bytes is taken here"
            if self._dir_bytes + max(declared_bytes, 0) > self.max_dir_bytes:
                return "the Space holds too many uploads at the moment; try again later"
            if self.per_hour:
                recent.append(now)
                if len(self._recent) > 10_000:  # forget the clients with no upload in the last hour
                    self._recent = {c: q for c, q in self._recent.items() if q and now - q[-1] < 3600}
        return None

    def metered(self, receive: Any, client: str) -> Any:
        """``receive`` counting the body's bytes against the request's and the folder's allowance; past either, the
        app receives ``http.disconnect`` instead of the rest."""
        with self._lock:
            allowance = min(self.max_request_bytes, max(self.max_dir_bytes - self._dir_bytes, 0))
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message.get("type") == "http.request":
                size = len(message.get("body", b""))
                seen += size
                with self._lock:
                    self._dir_bytes += size
                if seen > allowance:
                    logger.warning("cut off an upload from %s past %d bytes", client, allowance)
                    return {"type": "http.disconnect"}
            return message

        return counted

    def _sweep_in_thread(self) -> None:
        try:
            kept = self.sweep()
            with self._lock:
                self._dir_bytes = kept
        finally:
            self._sweeping = False

    def sweep(self) -> int:
        """Delete the uploads older than ``ttl_s`` (and the folders they leave empty; links are removed, never
        followed); the bytes that remain."""
        if not self.upload_dir.is_dir():
            return 0
        cutoff = time.time() - self.ttl_s
        kept = 0
        for folder, _, names in os.walk(self.upload_dir, topdown=False):
            for name in names:
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    info = os.lstat(path)
                    if info.st_mtime < cutoff:
                        os.unlink(path)
                    else:
                        kept += info.st_size
            if folder != str(self.upload_dir):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only when empty
        if self.received is not None:
            with contextlib.suppress(RuntimeError):  # the app added a path meanwhile: forget the rest next time
                for path in [p for p in list(self.received) if not os.path.lexists(p)]:
                    self.received.discard(path)
        return kept


class UploadsOnly:
    """ASGI middleware in front of the Gradio app: an API call may name only files Gradio's upload route received.

    Every POST but the upload route must carry a JSON body of at most :data:`MAX_API_BODY` bytes (else 413/400);
    every file object in it (any object with a ``path``, or Gradio's ``FileData`` marker) must name a file that
    ``check(path)`` accepts (:meth:`Board.check_upload`), else the request is answered 403 with a one-line
    reason, before Gradio copies, reads or serves anything. ``/file=<URL>`` (Gradio relays public URLs) is
    refused too. The upload route itself takes what ``gate`` admits (:class:`UploadGate`; else 429). Other
    requests pass unchanged.
    """

    def __init__(self, app: Any, check: Any, upload_route: str = UPLOAD_ROUTE, max_body: int = MAX_API_BODY,
                 gate: UploadGate | None = None):
        self.app = app
        self.check = check
        self.upload_route = upload_route
        self.max_body = max_body
        self.gate = gate

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        root = scope.get("root_path") or ""
        if root and path.startswith(root):
            path = path[len(root):]
        if scope["type"] == "http" and _REMOTE_FILE.search(path):  # Gradio would fetch and relay any public URL
            await _answer(send, 403, "remote files are not served here")
            return
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        if path.rstrip("/") == self.upload_route:
            if self.gate is not None:
                client = self.gate.client_key(scope)
                length = next((v for k, v in scope.get("headers") or [] if k == b"content-length"), b"0")
                reason = self.gate.admit(client, int(length) if length.isdigit() else 0)
                if reason:
                    logger.warning("refused an upload from %s: %s", client, reason)
                    await _answer(send, 429, reason)
                    return
                receive = self.gate.metered(receive, client)
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _answer(send, 413, f"request body over {self.max_body} bytes; files go to {self.upload_route}")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body.strip():
            try:
                value = json.loads(body)
            except (ValueError, RecursionError):
                await _answer(send, 400, "request body is not JSON")
                return
            reason = self._refused(value)
            if reason:
                logger.warning("refused a call naming a file that is not an upload (%s)", path)
                await _answer(send, 403, reason)
                return
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _refused(self, value: Any) -> str | None:
        """Why a JSON body names a file that is not an accepted upload, or None (iterative: no recursion)."""
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                meta = item.get("meta")
                if "path" in item or (isinstance(meta, dict) and meta.get("_type") == "gradio.FileData"):
                    try:
                        self.check(item.get("path"))
                    except UploadRefused as exc:
                        return str(exc)
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
        return None


async def _answer(send: Any, status: int, reason: str) -> None:
    body = json.dumps({"error": reason}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
