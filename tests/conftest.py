"""Fixtures every test module may use: one torch thread and the demo dataset, each set up once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (no OpenMP synchronisation); restored after the session."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """The offline demo build (`build_splits.py --demo`, seed 0), built once for the whole session."""
    from sake_dataset import build_demo

    out = tmp_path_factory.getbasetemp() / "sake_demo"
    if not (out / "sake_manifest.json").is_file():
        build_demo(out, seed=0)
    return out
