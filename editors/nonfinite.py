"""Where a NaN or an infinity first appears in a forward and backward pass (a diagnostic for diverged training).

:class:`NonFiniteTrace` hooks every submodule of the given roots. In the forward pass it notes the first module
whose output holds a non-finite value; in the backward pass, the first module output whose *gradient* holds one
(the backward of whatever consumed that output produced it). Autograd's anomaly mode runs alongside and names the
backward function that first returned a NaN, with the forward line that created it. Every check syncs the device,
so this is for re-running one failing instance, not for training.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import nn


@dataclass
class NonFiniteSite:
    """One non-finite tensor: the module (dotted name under its root), which output, its shape, how many values are
    NaN or infinite, and the index of the first of them."""

    module: str
    output: int
    shape: tuple[int, ...]
    count: int
    first_index: tuple[int, ...]

    @classmethod
    def of(cls, module: str, output: int, tensor: torch.Tensor) -> "NonFiniteSite | None":
        bad = ~torch.isfinite(tensor)
        if not bool(bad.any()):
            return None
        first = tuple(int(i) for i in bad.nonzero()[0].tolist())
        return cls(module, output, tuple(tensor.shape), int(bad.sum()), first)

    def __str__(self) -> str:
        out = f"output {self.output} of " if self.output else ""
        return (f"{out}{self.module} ({self.count} of {torch.Size(self.shape).numel()} values, shape "
                f"{list(self.shape)}, first at {list(self.first_index)})")


@dataclass
class NonFiniteTrace:
    """Context manager: hooks on every submodule of ``roots`` (name -> module) that record the first non-finite
    forward output and the first non-finite gradient of a module output. The block also runs under
    ``torch.autograd.detect_anomaly(check_nan=True)``, whose error is kept in :attr:`anomaly_error` (the block's
    RuntimeError is swallowed only when it is anomaly mode's)."""

    roots: dict[str, nn.Module]
    forward_site: NonFiniteSite | None = None
    backward_site: NonFiniteSite | None = None
    anomaly_error: str | None = None
    anomaly_forward: str | None = None
    _handles: list[Any] = field(default_factory=list)
    _exit: contextlib.ExitStack | None = None
    _caught: list[warnings.WarningMessage] = field(default_factory=list)

    def _forward_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs = output if isinstance(output, (tuple, list)) else (output,)
            for i, t in enumerate(outputs):
                if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
                    continue
                if self.forward_site is None:
                    self.forward_site = NonFiniteSite.of(name, i, t.detach())
                if t.requires_grad:
                    t.register_hook(self._gradient_hook(name, i))
        return hook

    def _gradient_hook(self, name: str, index: int) -> Any:
        def hook(grad: torch.Tensor) -> None:
            if self.backward_site is None:
                self.backward_site = NonFiniteSite.of(name, index, grad)
        return hook

    def __enter__(self) -> "NonFiniteTrace":
        for root_name, root in self.roots.items():
            for name, module in root.named_modules():
                full = f"{root_name}.{name}" if name else root_name
                self._handles.append(module.register_forward_hook(self._forward_hook(full)))
        # anomaly mode reports the forward traceback of a failing backward as a warning
        self._exit = contextlib.ExitStack()
        self._caught = self._exit.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        self._exit.enter_context(torch.autograd.detect_anomaly(check_nan=True))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._exit is None:
            return False
        self._exit.__exit__(kind, error, tb)
        self._exit = None
        if isinstance(error, RuntimeError) and "returned nan values" in str(error):
            self.anomaly_error = str(error).splitlines()[0]
            self.anomaly_forward = _forward_line(self._caught)
            return True
        return False

    def summary(self) -> str:
        """One sentence per finding (empty when nothing non-finite was seen)."""
        parts = []
        if self.forward_site is not None:
            parts.append(f"first non-finite forward output: {self.forward_site}")
        if self.backward_site is not None:
            parts.append(f"first non-finite gradient of a module output: {self.backward_site}")
        if self.anomaly_error is not None:
            where = f", created at {self.anomaly_forward}" if self.anomaly_forward else ""
            parts.append(f"anomaly mode: {self.anomaly_error}{where}")
        return "; ".join(parts)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def _forward_line(caught: list[warnings.WarningMessage]) -> str | None:
    """The innermost frame of anomaly mode's forward traceback that is not inside torch itself."""
    for message in reversed(caught):
        text = str(message.message)
        if "Traceback of forward call" not in text:
            continue
        frames = [m for m in _FRAME.finditer(text) if "/torch/" not in m.group(1)]
        if frames:
            path, line, func, code = frames[-1].groups()
            return f"{Path(path).parent.name}/{Path(path).name}:{line} in {func}: {code.strip()}"
    return None
