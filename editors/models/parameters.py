"""Parameters of a model addressed by their full names (``model.named_parameters()``): the module that owns one,
and temporary substitutes for some of them (per-edit copies in a batched pass, the released audio-encoder weights
of DeSTA2.5's transcripts)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule that holds parameter (or submodule) ``name`` and the attribute name inside it."""
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


@contextlib.contextmanager
def swapped_parameters(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily use ``tensors`` (full parameter names -> tensors, possibly requiring grad) in place of the
    model's parameters; the parameters themselves are untouched and put back on exit."""
    saved: list[tuple[nn.Module, str, Any]] = []
    try:
        for name, tensor in tensors.items():
            owner, attr = owner_of(model, name)
            saved.append((owner, attr, owner._parameters[attr]))
            owner._parameters[attr] = tensor  # type: ignore[assignment]  # a plain tensor, read back like the parameter
        yield
    finally:
        for owner, attr, param in reversed(saved):
            owner._parameters[attr] = param
