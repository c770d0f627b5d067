"""editors/nonfinite.py: the trace names where a non-finite value first appears, forward and backward."""

from __future__ import annotations

import torch
from torch import nn

from editors.nonfinite import NonFiniteTrace


class _InfAtFirstRow(nn.Module):
    """An infinity in row 0, a row the loss below never reads (as a padded position)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(torch.arange(x.shape[0])[:, None] == 0, float("inf"))


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), _InfAtFirstRow(), nn.Linear(4, 4))


def test_an_infinity_outside_the_loss_is_named_in_the_forward_and_as_the_nan_of_a_weight_gradient():
    net = _net()
    trace = NonFiniteTrace({"net": net})
    with trace:
        out = net(torch.randn(3, 4))
        loss = out[1:].sum()  # finite: row 0 is not read
        assert torch.isfinite(loss)
        loss.backward()
    assert trace.forward_site is not None and trace.forward_site.module == "net.1"
    assert trace.forward_site.first_index == (0, 0) and trace.forward_site.count == 4
    assert trace.backward_site is None  # every module output's gradient is finite: the NaN is in a weight's
    assert trace.anomaly_error is not None and "AddmmBackward0" in trace.anomaly_error
    assert trace.anomaly_forward is not None and "test_nonfinite.py" in trace.anomaly_forward
    summary = trace.summary()
    assert summary.startswith("first non-finite forward output: net.1 (4 of 12 values, shape [3, 4], first at [0, 0])")
    assert net[2].weight.grad is None  # anomaly mode stopped the backward before it reached the weights
    net(torch.randn(3, 4))[1:].sum().backward()  # untraced: a finite loss, a NaN weight gradient
    assert not torch.isfinite(net[2].weight.grad).all()


def test_a_finite_pass_reports_nothing_and_leaves_no_hook_behind():
    net = _net()
    net[1] = nn.Identity()
    with NonFiniteTrace({"net": net}) as trace:
        net(torch.randn(3, 4)).sum().backward()
    assert trace.summary() == ""
    assert all(not m._forward_hooks for m in net.modules()) and not torch.is_anomaly_enabled()


def test_an_error_that_is_not_anomaly_modes_passes_through():
    net = _net()
    try:
        with NonFiniteTrace({"net": net}):
            raise RuntimeError("something else")
    except RuntimeError as error:
        assert str(error) == "something else"
    else:
        raise AssertionError("the error was swallowed")
    assert not torch.is_anomaly_enabled() and all(not m._forward_hooks for m in net.modules())
