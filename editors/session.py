"""One edit session: the apply / restore sequence of an editing method on a loaded model, written once.

The runner (single edits, K edits per pass, sequences), :func:`sake.api.editing` and the bench all edit a model
through an :class:`EditSession`:

* on construction it snapshots the parameters the editor declares (:meth:`Editor.touched_parameters`, asked once,
  after :meth:`Editor.setup`) and notes whether any of them belongs to the audio encoder;
* :meth:`EditSession.apply` (or :meth:`EditSession.apply_many`) seeds torch when asked, applies the edit(s) with
  the attention kernels that are safe to backpropagate through (:func:`editors.models.kernels.training_attention`:
  never cuDNN's) and, when the encoder changed, clears the adapter's audio-state cache (cached encoder states would
  be stale);
* :meth:`EditSession.restore` copies the snapshot back bit-exactly, calls :meth:`Editor.reset` (the method's other
  state: prompts, side memories, replaced modules) and clears the audio-state cache again when the encoder was
  touched.

``with session.edit(request) as stats:`` applies one edit for the duration of the block; ``with session:`` restores
on leaving a block in which several :meth:`apply` calls accumulate (a sequence). Both restore on an exception too.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence, cast

import torch

from editors.base import EditRequest, Editor, ParameterSnapshot, RunContext
from editors.hparams import Hparams
from editors.models.base import LALMAdapter
from editors.models.kernels import training_attention


class EditSession:
    """Apply edits of ``editor`` to its adapter's model and undo them exactly (see the module docstring)."""

    def __init__(self, editor: Editor) -> None:
        self.editor = editor
        # the runner's side of the model (parameter groups, the audio-state cache) beside the method's interface
        self.adapter = cast(LALMAdapter, editor.adapter)
        touched = editor.touched_parameters()
        #: copies of every declared parameter (None for a method that declares none)
        self.snapshot = ParameterSnapshot(self.adapter.model, touched) if touched else None
        encoder = set(self.adapter.parameter_groups()["audio_encoder"])
        #: True when an edit may change audio-encoder weights (the audio-state cache is cleared after it)
        self.touches_encoder = bool(encoder & set(touched))

    @classmethod
    def start(cls, adapter: LALMAdapter, method: str, hparams: Hparams, context: RunContext | None = None
              ) -> "EditSession":
        """Build ``method``'s editor for ``adapter``, run its :meth:`Editor.setup`, and open a session on it."""
        from editors.registry import get_editor_class

        editor = get_editor_class(method)(adapter, hparams, context)
        editor.setup()
        return cls(editor)

    # ---- the steps -------------------------------------------------------------------------------------------

    def apply(self, edit: EditRequest, *, seed: int | None = None) -> dict[str, Any]:
        """Apply one edit on top of the current state (``seed``: torch's seed just before, for the same randomness
        on a resumed run); returns the method's stats."""
        if seed is not None:
            torch.manual_seed(seed)
        with training_attention():
            stats = self.editor.apply(edit)
        self._encoder_changed()
        return stats

    def apply_many(self, edits: Sequence[EditRequest], *, seed: int | None = None) -> list[dict[str, Any]]:
        """Apply K independent edits at once (:meth:`Editor.apply_many`); evaluate with
        :meth:`Editor.generate_many`, then :meth:`restore`."""
        if seed is not None:
            torch.manual_seed(seed)
        with training_attention():
            stats = self.editor.apply_many(edits)
        self._encoder_changed()
        return stats

    def restore(self) -> None:
        """Undo every edit applied since the session opened or the last restore: the declared parameters copied
        back bit-exactly, the method's other state reset, stale audio states dropped."""
        if self.snapshot is not None:
            self.snapshot.restore()
        self.editor.reset()
        self._encoder_changed()

    def _encoder_changed(self) -> None:
        if self.touches_encoder:
            self.adapter.clear_audio_cache()

    # ---- blocks ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def edit(self, edit: EditRequest, *, seed: int | None = None) -> Iterator[dict[str, Any]]:
        """``with session.edit(request) as stats:`` the model carries the edit inside the block only."""
        try:
            yield self.apply(edit, seed=seed)
        finally:
            self.restore()

    @contextlib.contextmanager
    def edits(self, edits: Sequence[EditRequest], *, seed: int | None = None) -> Iterator[list[dict[str, Any]]]:
        """``with session.edits(requests) as stats:`` K independent edits at once (:meth:`apply_many`) inside the
        block only."""
        try:
            yield self.apply_many(edits, seed=seed)
        finally:
            self.restore()

    def __enter__(self) -> "EditSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
