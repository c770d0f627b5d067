"""Bounded local load test of the served board (127.0.0.1 only; stops by itself). Prints figures, asserts nothing.

    python tools/leaderboard_loadtest.py [--requests 2000] [--concurrency 32] [--idle 1100] [--target static|space]

It serves a board built from a small results store generated with the tests' fixtures on 127.0.0.1 with the same server code the CLI
and the Space use (``serve.start_server``), then:

1. sends ``--requests`` GETs over ``--concurrency`` keep-alive connections (index.html, data.js, board.js and a
   submission JSON in turn; with ``--target space``: the Gradio page and a submission's item page), and reports
   errors, requests/s and latency p50 / p99 / max;
2. opens ``--idle`` connections from another loopback address (``--idle-from``, 127.0.0.2) that send half a
   request head and then nothing, checks that the board still answers a client at 127.0.0.1 while they are
   open, and counts how many the server closed at once (over its per-client cap) and after its head timeout.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the repository and its test fixtures (_leaderboard_helpers)

HOST = "127.0.0.1"


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: keep-alive\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
    if b"content-length" in headers:
        await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding") == b"chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    if headers.get(b"connection") == b"close":
        raise ConnectionResetError("server closed the connection")
    return status


async def _worker(port: int, paths: list[str], counter: list[int], total: int, latencies: list[float],
                  errors: list[str]) -> None:
    reader = writer = None
    while True:
        index = counter[0]
        if index >= total:
            break
        counter[0] += 1
        path = paths[index % len(paths)]
        start = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(HOST, port)
            status = await asyncio.wait_for(_get(reader, writer, path), timeout=30)
            if status != 200:
                errors.append(f"{path}: HTTP {status}")
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            errors.append(f"{path}: {type(exc).__name__}")
            if writer is not None:
                writer.close()
            reader = writer = None
            continue
        latencies.append(time.perf_counter() - start)
    if writer is not None:
        writer.close()


async def _burst(port: int, paths: list[str], total: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    counter = [0]
    start = time.perf_counter()
    await asyncio.gather(*(_worker(port, paths, counter, total, latencies, errors) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"requests": total, "concurrency": concurrency, "errors": len(errors), "first_errors": errors[:3],
            "requests_per_s": round(total / wall, 1), "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1),
            "max_ms": round(1000 * ordered[-1], 1) if ordered else None,
            "mean_ms": round(1000 * statistics.fmean(ordered), 1) if ordered else None}


async def _closed(connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> list[bool]:
    """Which connections the server has closed (a read gives EOF or fails at once)."""
    out = []
    for idle_reader, _ in connections:
        try:
            out.append(await asyncio.wait_for(idle_reader.read(1), timeout=0.02) == b"")
        except asyncio.TimeoutError:
            out.append(False)
        except OSError:
            out.append(True)
    return out


async def _idle_clients(port: int, count: int, probe_path: str, wait_s: float, source: str) -> dict[str, Any]:
    connections = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a head, never finished
        try:
            await writer.drain()
        except OSError:  # closed by the server already (over the per-client cap)
            pass
        connections.append((reader, writer))
    reader, writer = await asyncio.open_connection(HOST, port)
    start = time.perf_counter()
    status = await asyncio.wait_for(_get(reader, writer, probe_path), timeout=30)
    probe_ms = 1000 * (time.perf_counter() - start)
    writer.close()
    at_once = await _closed(connections)
    await asyncio.sleep(wait_s)
    later = await _closed([c for c, gone in zip(connections, at_once) if not gone])
    for _, idle_writer in connections:
        idle_writer.close()
    return {"idle_connections": count, "idle_from": source, "probe_status_while_idle": status,
            "probe_ms": round(probe_ms, 1), "closed_at_once_over_per_client_cap": sum(at_once),
            f"closed_after_head_timeout_{wait_s:g}s": sum(later)}


def _fixture_site(root: Path) -> tuple[Path, str, dict[str, Any]]:
    """A results store with three scored submissions (offline judge) and its built site."""
    from _leaderboard_helpers import METADATA, make_header, make_manifest, make_rows, write_submission_dir

    from eval.leaderboard.build import build_site
    from eval.leaderboard.store import LocalStore, add_submission

    manifest = make_manifest()
    store = LocalStore(root / "results")
    sid = ""
    for n, method in enumerate(("ft_audio", "ft_llm", "wise")):
        sub = write_submission_dir(root / f"s{n}", make_header(manifest, method=method),
                                   make_rows(manifest, wrong_every=3 + n), METADATA)
        sid = add_submission(sub, manifest, store, judge="offline").submission_id
    return build_site(root / "results", root / "site"), sid, manifest


def run(requests: int = 2000, concurrency: int = 32, idle: int = 1100, target: str = "static",
        idle_from: str = "127.0.0.2") -> dict[str, Any]:
    """Run the load test; return the figures."""
    from eval.leaderboard.serve import HEAD_TIMEOUT_S, make_app, start_server

    with tempfile.TemporaryDirectory(prefix="sake-load-") as tmp:
        site, sid, manifest = _fixture_site(Path(tmp))
        if target == "space":
            from eval.leaderboard.space import Board, SpaceConfig, create_app

            config = SpaceConfig(results_dir=str(Path(tmp) / "results"), queue_dir=str(Path(tmp) / "queue"),
                                 judge="offline", queue_interval_s=0)
            app = create_app(Board(config, manifest=manifest))
            paths = ["/", f"/submission/{sid}", f"/submission/{sid}?show=failed"]
        else:
            app = make_app(site)
            paths = ["/index.html", "/data.js", "/board.js", f"/submissions/{sid}.json"]
        server = start_server(app)
        port = int(server.url.rsplit(":", 1)[1])
        try:
            figures = {"target": target, "server": "uvicorn (serve.uvicorn_config)"}
            figures["burst"] = asyncio.run(_burst(port, paths, requests, concurrency))
            if idle:
                figures["idle"] = asyncio.run(_idle_clients(port, idle, paths[0], HEAD_TIMEOUT_S + 2, idle_from))
        finally:
            server.stop()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/leaderboard_loadtest.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="GET requests in the burst (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent connections (default %(default)s)")
    parser.add_argument("--idle", type=int, default=1100, help="half-sent idle connections (0: skip; default "
                        "%(default)s)")
    parser.add_argument("--idle-from", default="127.0.0.2",
                        help="loopback address the idle connections come from (default %(default)s)")
    parser.add_argument("--target", choices=["static", "space"], default="static",
                        help="the static board or the Gradio Space app (default %(default)s)")
    args = parser.parse_args(argv)
    if not ipaddress.ip_address(args.idle_from).is_loopback:
        parser.error("--idle-from must be a loopback address (127.0.0.0/8): the load test stays on this machine")
    print(json.dumps(run(args.requests, args.concurrency, args.idle, args.target, args.idle_from), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
