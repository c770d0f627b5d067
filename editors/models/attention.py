"""Which scaled-dot-product attention kernels may run where a gradient flows through the attention.

On H100/H200 GPUs, torch 2.11 and later pick cuDNN's attention by default, and its backward returns NaN query
gradients for some shapes when an attention mask is passed: a sequence length of 64 modulo 128 and a query row whose
log-sum-exp is very negative, which a fully masked (left-padded) row always is (PyTorch issue #196678). The forward
pass and the losses stay finite, so an optimiser step silently carries NaN into every weight it updates. Measured
here: KE's hypernetwork training on Qwen2-Audio-7B stopped at a non-finite gradient whose first NaN came from
``ScaledDotProductCudnnAttentionBackward0``.

:func:`training_attention` leaves every backend but cuDNN's allowed; the edit session (every method's ``apply``)
and the hypernetwork trainer run inside it. Generation runs outside it, with torch's default choice, so the outputs
of an unedited model do not change. On the CPU the allowed set picks the same kernels as the default one.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch.nn.attention import SDPBackend, sdpa_kernel

#: the SDPA backends allowed while gradients may flow through attention: all but cuDNN's (and ERROR, no backend)
TRAINING_BACKENDS = [b for name, b in SDPBackend.__members__.items() if name not in ("CUDNN_ATTENTION", "ERROR")]


@contextlib.contextmanager
def training_attention() -> Iterator[None]:
    """Inside the block, scaled-dot-product attention never runs cuDNN's kernel (see the module docstring); the
    previous choice comes back on leaving, on an exception too."""
    with sdpa_kernel(TRAINING_BACKENDS):
        yield
