"""The board's ASGI server: no listing, 404 for bad paths (no dropped connection), security headers, and a
client that never finishes its request head is disconnected."""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest

from eval.leaderboard import serve


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "HEAD_TIMEOUT_S", 0.5)
    (tmp_path / "index.html").write_text("<p>board</p>")
    (tmp_path / "submissions").mkdir()
    (tmp_path / "submissions" / "a.json").write_text("{}")
    running = serve.start_server(serve.make_app(tmp_path))
    yield running
    running.stop()


def _status(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers


def test_static_files_headers_and_no_listing(server):
    status, headers = _status(server.url + "/")
    assert status == 200 and headers["x-content-type-options"] == "nosniff"
    assert headers["content-security-policy"].startswith("default-src 'self'")
    assert headers["referrer-policy"] and "server" not in {k.lower() for k in headers}
    assert _status(server.url + "/submissions/a.json")[0] == 200
    for path in ("/submissions/", "/submissions", "/%00", "/..%2f..%2fetc%2fpasswd", "/nope"):
        status, headers = _status(server.url + path)
        assert status == 404 and headers["x-content-type-options"] == "nosniff", path


def test_half_sent_request_is_disconnected(server):
    port = int(server.url.rsplit(":", 1)[1])
    idle = socket.create_connection(("127.0.0.1", port))
    idle.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    idle.settimeout(10)
    start = time.monotonic()
    assert idle.recv(1) == b""  # closed by the server
    assert time.monotonic() - start < 9
    assert _status(server.url + "/")[0] == 200  # and the board still answers
