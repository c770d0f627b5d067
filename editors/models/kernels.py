"""Which kernels the library's attention calls and audio-encoder convolutions may run: never cuDNN's.

Attention (scaled dot product): every backend but cuDNN's. Two measured reasons, both on H100/H200 GPUs, where
torch 2.11 and later pick cuDNN's attention by default:

* Training: with an attention mask, cuDNN's backward returns NaN query gradients for some shapes: a sequence length
  of 64 modulo 128 and a query row whose log-sum-exp is very negative, which a fully masked (left-padded) row always
  is (PyTorch issue #196678). The forward pass and the losses stay finite, so an optimiser step silently carries NaN
  into every weight it updates. Measured here: KE's hypernetwork training on Qwen2-Audio-7B stopped at a non-finite
  gradient whose first NaN came from ``ScaledDotProductCudnnAttentionBackward0``.
* Generation and the audio encoders: cuDNN builds an execution plan on the host for every new shape, and the
  library's shapes are many (prompt widths, shared-prefix lengths, clip lengths). A profiled FT-LLM pass of 13 edits
  on an H100 left the GPU idle for 1.7 s of its 4.7 s while the host sat in ``aten::_cudnn_attention_forward``
  (``bench/pass_profile.py --stacks``); the memory-efficient and flash kernels need no plan.

Convolutions of the audio encoders (the Whisper towers' two, DeSTA2.5's Whisper): torch's own kernels (an unfolded
matrix product), not cuDNN's, for the same host-side plan: an encoder call whose (clips, frames) shape was new took
about 0.2 s more than one whose shape was not, on an H100 at 7B (five new shapes: 1.57 s against 0.47 s for 160
clips), while torch's own kernels took the same 0.47 s cold or warm. The convolutions are a few GFLOPs per clip.

:func:`training_attention` wraps the edit session (every method's ``apply``) and the hypernetwork trainer;
:func:`generation_attention` wraps every generation (:func:`editors.models.generation.generate`) and the audio
encoders (``LALMAdapter.audio_states``); :func:`encoder_convolutions` wraps the audio encoders' convolutions. On the
CPU the allowed kernels are the ones picked anyway, so the CPU outputs are unchanged; on the GPU the generated
tokens can differ from a cuDNN run's at near ties (bf16), and DeSTA2.5's fp32 Whisper convolutions run in full fp32
instead of cuDNN's TF32.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

#: the SDPA backends allowed while gradients may flow through attention: all but cuDNN's (and ERROR, no backend)
TRAINING_BACKENDS = [b for name, b in SDPBackend.__members__.items() if name not in ("CUDNN_ATTENTION", "ERROR")]
#: the SDPA backends allowed in generation and audio encoding: the same set (the bench's A/B may widen it)
GENERATION_BACKENDS = list(TRAINING_BACKENDS)
#: Whether the audio encoders' convolutions may run cuDNN's kernels (the bench's A/B sets it)
CONVOLUTION_CUDNN = False


@contextlib.contextmanager
def training_attention() -> Iterator[None]:
    """Inside the block, scaled-dot-product attention never runs cuDNN's kernel (see the module docstring); the
    previous choice comes back on leaving, on an exception too."""
    with sdpa_kernel(TRAINING_BACKENDS):
        yield


@contextlib.contextmanager
def generation_attention() -> Iterator[None]:
    """Inside the block, attention runs one of :data:`GENERATION_BACKENDS` (never cuDNN's by default); the previous
    choice comes back on leaving."""
    with sdpa_kernel(GENERATION_BACKENDS):
        yield


@contextlib.contextmanager
def encoder_convolutions() -> Iterator[None]:
    """Inside the block, convolutions run torch's own kernels unless :data:`CONVOLUTION_CUDNN` (see the module
    docstring); cuDNN's switch comes back on leaving, on an exception too."""
    if CONVOLUTION_CUDNN:
        yield
        return
    kept = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = kept
