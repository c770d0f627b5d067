"""The Python API: run an editing method, score its predictions, report, or apply one edit to a loaded model.

    from sake.api import RunConfig, run, score, editing

    path = run(RunConfig(model="tiny-qwen2-audio", method="ft_audio", dataset="/tmp/sake", configs=("emotion",),
                         limit=2, out="runs/"))
    results = score(path, judge="offline")
    print(results["metrics"]["overall"]["reliability"])

* :func:`run` is ``python -m editors.run`` without the command line: same resume, cache and output file.
* :func:`score` is ``python -m eval.score`` (offline judge or the LLM judge); :func:`report` is
  ``python -m eval.report``.
* :func:`editing` applies one edit to an adapter (``editors.models.load_adapter``) for the duration of a ``with``
  block; the tensors the method touched are restored bit-exactly on exit (and any other state it keeps, such as a
  prompt method's instructions, is dropped).

Importing this module needs no torch; each function imports what it runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from editors.config import RunConfig

if TYPE_CHECKING:  # pragma: no cover
    from editors.base import EditRequest, Editor
    from editors.models.base import GeneratedText, GenerationSettings, LALMAdapter, Prompt

__all__ = ["EditedModel", "RunConfig", "editing", "report", "run", "score"]


def run(config: RunConfig, *, adapter: "LALMAdapter | None" = None,
        rows_loader: "Callable[[str, str, str], Any] | None" = None) -> Path:
    """Run ``config`` (resuming a finished or interrupted run in the same output file) and return the predictions
    file. ``adapter``: an already loaded model to edit instead of loading ``config.model`` (it is restored after
    every edit). ``rows_loader(dataset, config, split)``: where instance rows come from instead of loading
    ``config.dataset`` with ``datasets`` (e.g. rows held in memory). In a multi-process launch, ranks other than 0
    return their own part file."""
    from editors.run import Runner

    runner = Runner(config, adapter=adapter, rows_loader=rows_loader)
    path = runner.run()
    return Path(path) if path is not None else runner.part_path


def score(predictions: str | os.PathLike | Sequence[str | os.PathLike], judge: str | None = None, *,
          out: str | os.PathLike | None = None, **judge_options: Any) -> dict[str, Any]:
    """Score a predictions file (or a list of the files of one run written one attribute each) and return the
    results dict (ARCHITECTURE.md "Results JSON"). ``judge``:
    ``"offline"`` (deterministic stages only) or ``"openai"`` (+ the LLM judge, the paper protocol); default: the
    paper protocol when ``OPENAI_API_KEY`` is set, else offline (``judge_options`` as in
    ``eval.score.score_predictions``: ``model``, ``base_url``, ``cache_dir``, ...). ``out``: also write the
    results JSON there (atomically)."""
    from eval.score import score_predictions, write_json_atomic

    results = score_predictions(predictions, judge=judge, **judge_options)
    if out is not None:
        write_json_atomic(out, results)
    return results


def report(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> list[Path]:
    """Paper-style tables and plots of results JSONs or predictions files (folders are searched) into ``out``;
    returns the written files."""
    from eval.report import load_runs, write_report

    return write_report(load_runs([str(p) for p in inputs]), out)


class EditedModel:
    """The model inside an :func:`editing` block: :meth:`generate` answers prompts under the edit (a prompt
    method's rewriting included); ``adapter``, ``editor``, ``edit``, ``stats`` (what the method reported) and
    ``settings`` (the generation settings a run of this method on this model resolves) are there for anything
    else."""

    def __init__(self, adapter: "LALMAdapter", editor: "Editor", edit: "EditRequest", stats: dict[str, Any],
                 settings: "GenerationSettings") -> None:
        self.adapter, self.editor, self.edit, self.stats, self.settings = adapter, editor, edit, stats, settings

    def generate(self, prompts: "Sequence[Prompt]", max_new_tokens: int | None = None, **limits: Any) -> "list[GeneratedText]":
        """Greedy answers of ``prompts`` under the edit, with the run's generation settings (the model family's
        ``max_new_tokens`` unless given; ``limits``: ``batch_size``, ``max_batch_tokens``)."""
        settings = self.settings
        if max_new_tokens is not None or limits:
            settings = settings.replace(**({"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {}),
                                        **limits)
        rewritten = self.editor.rewrite_prompts(list(prompts), self.edit)
        return self.adapter.generate(rewritten, settings=settings)


@contextlib.contextmanager
def editing(adapter: "LALMAdapter", method: str, request: "EditRequest | Mapping[str, Any]",
            hparams: Mapping[str, Any] | None = None, *, seed: int = 0, cache_dir: str | None = None,
            dataset: str | os.PathLike | None = None) -> Iterator[EditedModel]:
    """Apply one edit of ``method`` to ``adapter`` on entering the block and undo it on leaving (also on an
    exception): every tensor the method touched is copied back bit-exactly and its other state is reset.

    ``request``: an ``editors.base.EditRequest`` or a SAKE instance row (``datasets`` row of any attribute
    config). ``hparams``: overrides of the method's YAML entry for the adapter's family (unknown keys are an
    error). ``cache_dir``: where KE / MEND find their trained hypernetworks (default ``$SAKE_CACHE``; the folder
    ``sake train --model NAME`` wrote for this model). ``dataset``: the SAKE release the request comes from (a
    folder or Hub id), for methods that read other rows of it as a run does: IE-IKE's demonstrations, the train
    items UnKE and WISE preserve, AlphaEdit's statistics; such a method refuses to edit without it."""
    from editors.base import EditRequest, RunContext
    from editors.data import load_instances
    from editors.models.registry import run_model_name
    from editors.registry import get_editor_class, load_hparams
    from editors.session import EditSession

    edit = request if isinstance(request, EditRequest) else EditRequest.from_row(dict(request))
    typed = load_hparams(method, adapter.family, tiny=adapter.is_tiny, overrides=dict(hparams or {}))
    # (config, split) -> rows of the release, each loaded once (as a run's RunPlan.load_rows)
    load_rows = functools.cache(lambda config, split: load_instances(str(dataset), config, split))
    # the settings `sake.run` resolves for this method and model (family defaults: the same max_new_tokens)
    settings = adapter.generation_settings(method_engines=get_editor_class(method).generation_engines, method=method)
    context = RunContext(seed=seed, cache_dir=cache_dir, load_rows=load_rows if dataset is not None else None,
                         model_name=run_model_name(adapter), generation=settings)
    session = EditSession.start(adapter, method, typed, context)
    with session.edit(edit, seed=seed) as stats:
        yield EditedModel(adapter, session.editor, edit, stats, settings)
