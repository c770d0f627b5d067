"""Start a published Space folder (`sake publish ... --dry-run DIR`) as its own process on 127.0.0.1, as the Hub
would run it: its `app.py`, its own code only, the toolkit's editors/, sake/ and torch unimportable."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def space_env(**extra: str) -> dict[str, str]:
    """The machine's environment for a Space process: no PYTHONPATH (the folder's own code), no SAKE_* or token,
    the Hub offline (any Hub call fails at once), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("SAKE_", "HF_TOKEN"))}
    env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONDONTWRITEBYTECODE="1", HOST="127.0.0.1",
               **extra)
    return env


#: runs the published folder's app.py as the Space does, with the toolkit's editors/ and sake/ made unimportable
RUN_APP = ("import runpy, sys\nfor name in ('editors', 'sake', 'torch'):\n    sys.modules[name] = None\n"
           "sys.argv = ['app.py', *sys.argv[1:]]\nrunpy.run_path('app.py', run_name='__main__')\n")


def start_space(folder: Path, port: int, env: dict[str, str], *args: str) -> subprocess.Popen:
    """``python app.py ARGS`` in ``folder`` on ``port``; its output goes to ``folder.parent/space-PORT.log``."""
    with open(folder.parent / f"space-{port}.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-c", RUN_APP, *args], cwd=folder, env=dict(env, PORT=str(port)),
                                stdout=log, stderr=subprocess.STDOUT)


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Wait until ``url`` answers 200; fail with the log's tail when the process ends or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("the Space did not start: " + log.read_text(errors="replace")[-3000:])
        time.sleep(0.5)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


