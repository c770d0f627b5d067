"""`sake demo`: the main job on a fresh machine, end to end, on CPU in minutes.

1. build the demo dataset from the embedded synthetic sources (``build_splits.py --demo``) into ``OUT/dataset``;
2. load the reference model (``models/sake-reference-qwen2-audio``: a small Qwen2-Audio trained on the demo
   sources by ``tools/train_reference_model.py``);
3. train the KE / MEND hypernetworks on the demo train split (when those methods exist);
4. run single editing with every available method on the test split, and sequential runs (FT-Audio and the
   methods beyond the paper's eight);
5. score every run with the offline judge, write the report (tables + plots) and print the paper-style table.

A rerun with the same ``--out`` reuses what is finished: the dataset, trained hypernetworks and the runs (the runner
resumes; finished runs are skipped). ``--update-readme`` rewrites the block between ``<!-- demo-table:start -->``
and ``<!-- demo-table:end -->`` in README.md (the one in the current folder, else the checkout's) with the table
this run printed and the wall time of the demo's work (a run that reused earlier work keeps the time of the run
that did it, or states none).

    sake demo                      # everything (a few minutes on 2 CPU cores)
    sake demo --limit 2            # quick: 2 instances per attribute, 1 sequence
    sake demo --update-readme      # and refresh the README's demo table
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from sake_core.atomic import atomic_write
from sake_core.protocol import METHOD_NAMES
from sake_core.shipped import shipped_path
from editors.registry import method_sort_key
from sake_core.errors import ConfigError, DataError, SakeError, user_errors

logger = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = shipped_path("models/sake-reference-qwen2-audio")  # the checkout's models/, or the wheel's copy
README = REPO_DIR / "README.md"
START_MARKER = "<!-- demo-table:start -->"
END_MARKER = "<!-- demo-table:end -->"

COLUMNS = (("reliability", "Reliability"), ("generality", "Generality"), ("locality_audio", "Audio locality"),
           ("locality_text", "Text locality"), ("portability", "Portability"))


# ----------------------------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------------------------


def build_dataset(out: Path, seed: int, progress: bool = True) -> Path:
    """The demo dataset in ``out`` (built once; a folder with a manifest is reused)."""
    if (out / "sake_manifest.json").is_file():
        logger.info("reusing the demo dataset in %s", out)
        return out
    from sake_dataset import build_demo

    build_demo(out, seed=seed, progress=progress)
    return out


def model_fingerprint(model: str) -> str:
    """sha256 over a local model directory's weight and config files ('' for a Hub id)."""
    import hashlib

    path = Path(model)
    if not path.is_dir():
        return ""
    h = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and (file.suffix in (".safetensors", ".bin") or file.name == "config.json"):
            h.update(file.name.encode())
            h.update(hashlib.sha256(file.read_bytes()).digest())
    return h.hexdigest()


def reset_if_model_changed(out: Path, model: str) -> None:
    """Runs, pre-edit cache and hypernetworks in ``out`` belong to one model: when the weights changed (say, the
    reference model was retrained), drop them so that nothing stale is reused. (The runner keys its pre-edit cache
    and resume check by model id + config, not by the weights.)"""
    stamp = out / "model_fingerprint.txt"
    current = f"{model}\n{model_fingerprint(model)}\n"
    if stamp.is_file() and stamp.read_text(encoding="utf-8") != current:
        logger.warning("%s: the model changed since the last demo run; dropping its runs, cache and hypernetworks",
                       out)
        for name in ("runs", "cache", "hypernetworks", "report"):
            shutil.rmtree(out / name, ignore_errors=True)
    atomic_write(stamp, current)


def methods_to_run(requested: Sequence[str] | None) -> list[str]:
    """Requested methods (default: every available one) in display order, the parameter-updating methods before
    the in-context ones (an editor class with ``changes_parameters`` False; the paper's discussion groups them so);
    unknown names are an error."""
    from editors.registry import available_methods, get_editor_class

    available = available_methods()
    if requested:
        missing = [m for m in requested if m not in available]
        if missing:
            raise ConfigError(f"method(s) {missing} not available (available: {available})")
        chosen = list(requested)
    else:
        chosen = list(available)
    return sorted(chosen, key=lambda m: (not get_editor_class(m).changes_parameters, method_sort_key(m)))


def sequential_methods(requested: str, single: Sequence[str]) -> list[str]:
    """The methods of the sequential runs: ``none``, a comma-separated list, or ``auto`` = FT-Audio plus every
    method of ``single`` outside the paper's eight (they were built against sequential forgetting), in order."""
    from editors.registry import available_methods

    if requested.strip().lower() == "none":
        return []
    if requested.strip().lower() == "auto":
        return methods_to_run(["ft_audio"] + [m for m in single if m not in METHOD_NAMES and m != "ft_audio"])
    chosen = [m.strip() for m in requested.split(",") if m.strip()]
    missing = [m for m in chosen if m not in available_methods()]
    if missing:
        raise ConfigError(f"sequential method(s) {missing} not available")
    return chosen


def train_hypernetwork(method: str, model: str, dataset: Path, out: Path, seed: int, limit: int | None,
                       progress: bool = True) -> list[str]:
    """Train a KE / MEND hypernetwork on the demo train split with ``editors.train`` (once; reused after) and
    return the ``--hparam`` overrides that point the method at it."""
    from editors.train import train_hypernetwork

    target = out / f"{method}"
    done = target / "DONE"
    if not done.is_file():
        logger.info("training the %s hypernetwork into %s", method, target)
        try:
            # a quick run (--limit) trains on 2 instances per config: 2 of those 8 validate
            train_hypernetwork(method, model, str(dataset), out=target, seed=seed,
                               limit=None if limit is None else max(limit, 2),
                               hparams={} if limit is None else {"val_size": 2}, progress=progress)
        except SakeError as exc:
            raise SakeError(f"training the {method} hypernetwork failed: {exc}") from exc
        atomic_write(done, "ok\n")
    return hypernetwork_overrides(method, target)


def hypernetwork_overrides(method: str, directory: Path) -> list[str]:
    """``KEY=VALUE`` overrides naming a trained hypernetwork (the ``hypernetwork_path`` of KE / MEND)."""
    from editors.registry import get_editor_class

    if "hypernetwork_path" in get_editor_class(method).hparams_class.field_names():
        return [f"hypernetwork_path={directory}"]
    return []


def run_method(model: str, method: str, mode: str, dataset: Path, runs: Path, cache: Path, seed: int,
               limit: int | None, overrides: Sequence[str], progress: bool) -> Path:
    """One editing run (:func:`sake.api.run`; resumes a finished or interrupted run); returns the predictions
    path."""
    from editors.hparams import parse_overrides
    from sake.api import RunConfig, run

    # generation settings as any run resolves them for the model (the reference model is a tiny one: 32 new tokens,
    # editors/models/generation/defaults.yaml; the report's generation_limits table counts the outputs that reach it)
    return run(RunConfig(model=model, method=method, dataset=str(dataset), split="test", mode=mode, out=str(runs),
                         seed=seed, cache_dir=str(cache), limit=limit, hparams=parse_overrides(overrides),
                         progress=progress))


def score_run(predictions: Path) -> dict[str, Any]:
    """Offline-judge scores of a predictions file, written next to it as ``NAME.results.json``."""
    from sake.api import score

    return score(predictions, judge="offline",
                 out=predictions.with_name(predictions.name[:-len(".jsonl")] + ".results.json"))


# ----------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.2f}"


def demo_table(results: Sequence[dict[str, Any]]) -> str:
    """Paper-style markdown table: one row per run (methods x reliability, generality, audio locality, text
    locality, portability; values in percent)."""
    from eval.report import method_label

    lines = ["| Method | Mode | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|---|" + "|".join("---:" for _ in COLUMNS) + "|"]
    for res in results:
        overall = res["metrics"]["overall"]
        lines.append(f"| {method_label(res)} | {res.get('mode', 'single')} | "
                     + " | ".join(_fmt(overall.get(key)) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def readme_block(table: str, *, command: str, model: str, n_items: int, wall_s: float | None,
                 plots: Sequence[str]) -> str:
    """The README's demo section body (between the markers): how it was made (``wall_s``: the wall time of the
    demo's work, None when not measured), the table, the line saying its numbers are not comparable with the
    paper's (the demo scores offline), the plots."""
    from eval.sake_metric.scoring import NOT_COMPARABLE_LINE

    timing = f"{wall_s / 60:.1f} min wall time on CPU" if wall_s is not None else "wall time not measured"
    lines = [
        f"Made by `{command}` on the reference model `{model}` (demo test split, {n_items} prediction rows, "
        f"offline judge, {timing}). Values in percent; single editing averages "
        "over the edits, sequential over gaps 0-4; regenerate with `sake demo --update-readme`.",
        "",
        table,
        "",
        NOT_COMPARABLE_LINE,
        "",
    ]
    if plots:
        lines += ["Plots: " + ", ".join(f"`{p}`" for p in plots), ""]
    return "\n".join(lines)


def replace_block(text: str, body: str, where: str = "README.md") -> str:
    """``text`` with everything between the demo markers replaced by ``body`` (markers kept)."""
    start = text.find(START_MARKER)
    end = text.find(END_MARKER)
    if start < 0 or end < 0 or end < start:
        raise DataError(f"{where}: expected the markers {START_MARKER} and {END_MARKER} (in this order) around the "
                         "demo table")
    head = text[: start + len(START_MARKER)]
    return head + "\n" + body.rstrip("\n") + "\n" + text[end:]


def readme_to_update() -> Path:
    """The README ``--update-readme`` rewrites: the current folder's when it holds the demo markers (a checkout,
    whatever way the toolkit is installed), else the checkout's next to this package."""
    here = Path.cwd() / "README.md"
    if here.is_file() and START_MARKER in here.read_text(encoding="utf-8"):
        return here
    return README


def _summary(out: Path) -> dict[str, Any]:
    """The ``demo_summary.json`` an earlier run wrote in ``out`` ({} when there is none or it is unreadable)."""
    try:
        summary = json.loads((out / "demo_summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def update_readme(readme: Path, body: str) -> None:
    """Rewrite the demo block of ``readme`` (only the text between the markers changes)."""
    if not readme.is_file():
        raise DataError(f"{readme}: no README to update")
    text = readme.read_text(encoding="utf-8")
    new = replace_block(text, body, str(readme))
    if new != text:
        atomic_write(readme, new)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sake demo", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo",
                   help="work folder: dataset, runs, scores, report (default: %(default)s)")
    p.add_argument("--model", default=None,
                   help="model to edit (default: the shipped reference model models/sake-reference-qwen2-audio)")
    p.add_argument("--limit", type=int, default=None,
                   help="quick run: first N test instances per attribute, and one sequence")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: every available method)")
    p.add_argument("--sequential-methods", "--sequential-method", dest="sequential_methods", default="auto",
                   help="comma-separated methods of the sequential runs ('none' to skip; 'auto': FT-Audio, the "
                        "paper's most robust sequential baseline, and every method run here that the paper does "
                        "not have; default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default: 1; the reference model is small, a second thread only adds "
                        "synchronisation, and on a shared machine it spins; 0: torch's choice)")
    p.add_argument("--hparam", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="hyperparameter override for one method, e.g. ft_audio:lr=0.01 (repeatable)")
    p.add_argument("--update-readme", action="store_true",
                   help="rewrite the demo table between the markers in README.md (the current folder's, else the "
                        "checkout's); the block is also written to OUT/demo_table.md")
    p.add_argument("--readme", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--log-level", default="WARNING")
    return p


@user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    start = time.time()
    import torch

    from editors.hypernetwork import hypernetwork_methods

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_progress:  # the libraries' own bars too (weight loading, dataset building)
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    out = Path(args.out)
    model = str(Path(args.model) if args.model else DEFAULT_MODEL)
    if not Path(model).exists() and "/" not in model:
        raise ConfigError(f"model {model} not found")
    if args.model is None and not (DEFAULT_MODEL / "config.json").is_file():
        raise ConfigError(f"the reference model is missing ({DEFAULT_MODEL}); train it with "
                         "`python -m tools.train_reference_model`")
    methods = methods_to_run([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None)
    sequential = sequential_methods(args.sequential_methods, methods)
    overrides: dict[str, list[str]] = {}
    for item in args.hparam:
        method, _, kv = item.partition(":")
        if not kv or "=" not in kv:
            raise ConfigError(f"--hparam {item!r}: expected METHOD:KEY=VALUE")
        overrides.setdefault(method, []).append(kv)

    plan: list[tuple[str, str]] = [(m, "single") for m in methods]
    plan += [(m, "sequential") for m in sequential]
    hypernetwork = set(hypernetwork_methods())  # the methods whose editor applies a trained network
    steps = 1 + sum(m in hypernetwork for m in methods) + len(plan) + 1
    stage = tqdm(total=steps, desc="sake demo", unit="stage", disable=args.no_progress, position=0,
                 dynamic_ncols=True)

    def say(text: str) -> None:
        stage.set_postfix_str(text)
        tqdm.write(f"[sake demo] {text}")

    reset_if_model_changed(out, model)
    scope = "full" if args.limit is None else f"limit{args.limit}"
    # the time of the demo's work: this run's, unless it reused work an earlier run did (then that run's time)
    reused = any((out / name).exists() for name in (f"runs/{scope}", f"hypernetworks/{scope}", "cache"))
    earlier = _summary(out) if reused else {}
    work_s = earlier.get("work_s") if earlier.get("limit") == args.limit else None
    reusing = (out / "dataset" / "sake_manifest.json").is_file()
    say(f"{'reusing' if reusing else 'building'} the demo dataset in {out / 'dataset'}")
    dataset = build_dataset(out / "dataset", args.seed, progress=not args.no_progress)
    stage.update(1)
    for method in methods:
        if method in hypernetwork:
            trained = (out / "hypernetworks" / scope / method / "DONE").is_file()
            say(f"reusing the trained {method} hypernetwork" if trained else
                f"training the {method} hypernetwork on the demo train split")
            overrides.setdefault(method, [])
            overrides[method] += train_hypernetwork(method, model, dataset, out / "hypernetworks" / scope, args.seed,
                                                    args.limit, progress=not args.no_progress)
            stage.update(1)
    runs_dir = out / "runs" / scope
    results: list[dict[str, Any]] = []
    for method, mode in plan:
        say(f"{method} ({mode} editing)")
        path = run_method(model, method, mode, dataset, runs_dir, out / "cache", args.seed,
                          args.limit if mode == "single" else (args.limit and 1), overrides.get(method, []),
                          not args.no_progress)
        results.append(score_run(path))
        stage.update(1)
    say("writing the report")
    from sake.api import report

    written = report([runs_dir], out / "report")
    stage.update(1)
    stage.close()
    wall = time.time() - start
    if not reused:
        work_s = wall
    plots = [str(p) for p in written if p.suffix == ".png"]
    from eval.sake_metric.scoring import NOT_COMPARABLE_LINE

    table = demo_table(results)
    n_items = sum(int(r.get("n_rows") or 0) for r in results)
    print()
    print(f"SAKE demo: {Path(model).name}, test split"
          + (f", first {args.limit} instance(s) per attribute" if args.limit else "")
          + f", offline judge ({wall / 60:.1f} min)")
    print()
    print(table)
    print()
    print(NOT_COMPARABLE_LINE)  # the demo scores offline (deterministic): not the paper's protocol
    print()
    print(f"report: {out / 'report' / 'index.md'}")
    for p in plots:
        print(f"plot:   {p}")
    command = "sake demo" + (f" --limit {args.limit}" if args.limit else "")
    body = readme_block(table, command=command, model=Path(model).name, n_items=n_items, wall_s=work_s,
                        plots=[os.path.relpath(p, REPO_DIR) if Path(p).resolve().is_relative_to(REPO_DIR) else p
                               for p in plots])
    atomic_write(out / "demo_table.md", body)
    summary = {"model": model, "methods": methods, "sequential": sequential, "limit": args.limit,
               "wall_s": round(wall, 1), "work_s": None if work_s is None else round(work_s, 1), "results": [{"method": r.get("method"), "mode": r.get("mode"),
                                                     **{k: r["metrics"]["overall"].get(k) for k, _ in COLUMNS}}
                                                    for r in results]}
    atomic_write(out / "demo_summary.json", json.dumps(summary, indent=1) + "\n")
    if args.update_readme:
        readme = Path(args.readme) if args.readme else readme_to_update()
        try:
            update_readme(readme, body)
        except DataError as exc:
            print(f"sake demo: README not updated: {exc} (the block is in {out / 'demo_table.md'})",
                  file=sys.stderr)
            return 1
        print(f"updated the demo table in {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
