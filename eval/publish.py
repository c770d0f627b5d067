"""Publish SAKE on the Hugging Face Hub: the dataset, the metric Space, the leaderboard Space.

    sake publish dataset     ORG/NAME --from BUILT_DIR          [--dry-run DIR]
    sake publish metric      ORG/NAME                           [--dry-run DIR]
    sake publish leaderboard ORG/NAME [--results-repo ORG/NAME] [--manifest sake/sake] [--judge paper]
                                                                [--dry-run DIR]

``--dry-run DIR`` writes exactly the folder that would be uploaded into DIR (replaced as a whole) and uploads
nothing. Without it the folder is built in a temporary directory and uploaded with ``huggingface_hub`` (token from
``HF_TOKEN`` or ``huggingface-cli login``):

- **dataset**: the folder ``build_splits.py`` built (Parquet, card, ``sake_manifest.json``) as a dataset repo,
  i.e. ``build_splits.py --push-to-hub``;
- **metric**: a Gradio Space whose root holds ``NAME.py`` (the metric module ``eval/sake_metric/sake_metric.py``
  under the name ``evaluate.load("ORG/NAME")`` fetches), its helper modules, ``app.py`` (evaluate's widget), a
  ``requirements.txt`` and the metric card with the Space front matter (``sdk``, ``sdk_version``, ``app_file``).
  ``evaluate.load(DIR)`` works on the dry-run folder when its last component is NAME;
- **leaderboard**: a Gradio Space (``eval.leaderboard.space``) with its front matter, ``app.py``, a slim
  ``requirements.txt`` (no torch, no transformers), the ``eval`` code it runs, and ``leaderboard.json`` wiring it
  to the results store, a Hub dataset repo (``--results-repo``, default ``ORG/NAME-results``, created when
  missing). Give the Space the secrets ``HF_TOKEN`` (write access to the results repo) and the judge's API key.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from sake_core.errors import ConfigError, user_errors

logger = logging.getLogger("eval.publish")

ROOT = Path(__file__).resolve().parents[1]
METRIC_DIR = ROOT / "eval" / "sake_metric"
METRIC_SCRIPT = "sake_metric.py"
#: evaluate's widget (evaluate.utils.launch_gradio_widget) is written against Gradio 3's ``gr.inputs`` API.
METRIC_SDK_VERSION = "3.19.1"
LEADERBOARD_SDK_VERSION = "6.31.0"  # the Gradio the Space is tested with (requirements.txt)
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
METRIC_REQUIREMENTS = ["evaluate>=0.4.6", "datasets>=4.0", "openai>=1.60", "tqdm>=4.66"]
LEADERBOARD_REQUIREMENTS = ["huggingface_hub>=0.30", "jsonschema>=4.20", "fastapi", "uvicorn>=0.30", "openai>=1.60",
                            "tqdm>=4.66"]
#: What the leaderboard Space runs: its own package, the scorer and the metric's modules (all torch-free).
LEADERBOARD_CODE = ("eval/__init__.py", "eval/score.py", "eval/sake_metric", "eval/leaderboard", "sake_core", "sake")

METRIC_APP = '''"""The metric's Space: evaluate's widget for the SAKE metric (this repository's {name}.py)."""
import evaluate
from evaluate.utils import launch_gradio_widget

module = evaluate.load("{repo_id}")
launch_gradio_widget(module)
'''

LEADERBOARD_APP = '''"""The SAKE leaderboard Space: Gradio app, submission queue and item pages (eval/leaderboard/space.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval.leaderboard.space import main  # noqa: E402

if __name__ == "__main__":
    main()
'''

LEADERBOARD_CARD = """---
title: SAKE leaderboard
emoji: 🎧
colorFrom: indigo
colorTo: green
sdk: gradio
sdk_version: {sdk_version}
app_file: app.py
pinned: true
license: apache-2.0
short_description: Editing auditory attribute knowledge of audio-language models
---

# SAKE leaderboard

Scores of knowledge edits of large audio-language models on the SAKE benchmark (*SAKE: Towards Editing Auditory
Attribute Knowledge of Large Audio-Language Models*). Submit a `.zip` of `predictions.jsonl` (the file
`python -m editors.run` writes) and `metadata.json` on the Submit tab; the board validates it at once, queues it
and scores it itself ({judge} protocol).

Results live in the dataset repo [`{results_repo}`](https://huggingface.co/datasets/{results_repo}); the release
manifest submissions are checked against is `{manifest}`. This Space needs the secrets `HF_TOKEN` (write access
to the results repo) and, for the paper protocol, the judge's API key (`OPENAI_API_KEY`).
"""


class PublishError(ConfigError):
    """Bad arguments for publishing (one line)."""


def _check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id):
        raise PublishError(f"repo id {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def _front_matter(card: str, extra: dict[str, str]) -> str:
    """``card`` with ``extra`` keys set in its YAML front matter (added at its end; a key already there is kept)."""
    match = re.match(r"^---\n(.*?\n)---\n", card, re.S)
    head, body = (match.group(1), card[match.end():]) if match else ("", card)
    present = {line.split(":", 1)[0].strip() for line in head.splitlines() if re.match(r"^[A-Za-z_]\w*:", line)}
    head += "".join(f"{key}: {value}\n" for key, value in extra.items() if key not in present)
    return f"---\n{head}---\n{body}"


def _write_folder(files: dict[str, bytes], out: Path) -> Path:
    """Write ``files`` (relative path -> bytes) into a fresh folder that replaces ``out`` as a whole."""
    from eval.leaderboard.build import write_tree

    write_tree(Path(out), files)
    return Path(out).resolve()


# ---------------------------------------------------------------------------------------------- metric

def metric_files(repo_id: str) -> dict[str, bytes]:
    """The metric Space's files: ``NAME.py``, helper modules, ``app.py``, ``requirements.txt``, ``README.md``."""
    name = _check_repo_id(repo_id).split("/")[1]
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise PublishError(f"metric repo name {name!r}: evaluate imports NAME.py as a module, so NAME must be a "
                           "Python identifier (e.g. sake/metric)")
    files: dict[str, bytes] = {}
    for path in sorted(METRIC_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        files[f"{name}.py" if path.name == METRIC_SCRIPT else path.name] = path.read_bytes()
    card = (METRIC_DIR / "README.md").read_text(encoding="utf-8")
    card = card.replace('evaluate.load("eval/sake_metric")', f'evaluate.load("{repo_id}")')
    files["README.md"] = _front_matter(card, {
        "emoji": "🎧", "colorFrom": "indigo", "colorTo": "green", "sdk": "gradio",
        "sdk_version": METRIC_SDK_VERSION, "app_file": "app.py", "pinned": "false"}).encode("utf-8")
    files["app.py"] = METRIC_APP.format(name=name, repo_id=repo_id).encode("utf-8")
    files["requirements.txt"] = ("\n".join(METRIC_REQUIREMENTS) + "\n").encode("utf-8")
    return files


# ---------------------------------------------------------------------------------------------- leaderboard

def _code_files(entries: tuple[str, ...]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for entry in entries:
        path = ROOT / entry
        if path.is_file():
            files[entry] = path.read_bytes()
        elif path.is_dir():
            for item in sorted(path.rglob("*")):
                if item.is_file() and "__pycache__" not in item.parts and item.suffix != ".pyc":
                    files[str(item.relative_to(ROOT))] = item.read_bytes()
    return files


def leaderboard_files(repo_id: str, results_repo: str | None = None, manifest: str = "sake/sake",
                      judge: str = "paper", queue_interval_s: float = 30.0) -> dict[str, bytes]:
    """The leaderboard Space's files: card, ``app.py``, slim requirements, ``leaderboard.json`` and the code."""
    _check_repo_id(repo_id)
    results_repo = _check_repo_id(results_repo or f"{repo_id}-results")
    files = _code_files(LEADERBOARD_CODE)
    files["README.md"] = LEADERBOARD_CARD.format(sdk_version=LEADERBOARD_SDK_VERSION, results_repo=results_repo,
                                                 manifest=manifest, judge=judge).encode("utf-8")
    files["app.py"] = LEADERBOARD_APP.encode("utf-8")
    files["requirements.txt"] = ("\n".join(LEADERBOARD_REQUIREMENTS) + "\n").encode("utf-8")
    config = {"results_repo": results_repo, "manifest": manifest, "judge": judge,
              "queue_interval_s": queue_interval_s, "queue_dir": "queue"}
    files["leaderboard.json"] = (json.dumps(config, indent=1, sort_keys=True) + "\n").encode("utf-8")
    return files


# ---------------------------------------------------------------------------------------------- upload

def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(token=os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))


def upload_space(folder: Path, repo_id: str, message: str) -> None:
    """Create the Gradio Space ``repo_id`` when missing and upload ``folder`` as one commit."""
    api = _api()
    api.create_repo(repo_id, repo_type="space", space_sdk="gradio", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="space", commit_message=message)
    logger.info("uploaded %s to https://huggingface.co/spaces/%s", folder, repo_id)


def publish_metric(repo_id: str, dry_run: str | os.PathLike | None = None) -> Path | None:
    """Build the metric Space folder; write it to ``dry_run`` or upload it."""
    files = metric_files(repo_id)
    if dry_run:
        return _write_folder(files, Path(dry_run))
    with tempfile.TemporaryDirectory(prefix="sake-publish-") as tmp:
        upload_space(_write_folder(files, Path(tmp) / "space"), repo_id, "SAKE metric")
    return None


def publish_leaderboard(repo_id: str, results_repo: str | None = None, manifest: str = "sake/sake",
                        judge: str = "paper", dry_run: str | os.PathLike | None = None,
                        private_results: bool = False) -> Path | None:
    """Build the leaderboard Space folder; write it to ``dry_run`` or create the results repo and upload.

    ``private_results`` creates the results repo private (the submitted predictions are then visible to its
    members only; the Space reads it with its ``HF_TOKEN`` secret)."""
    files = leaderboard_files(repo_id, results_repo, manifest=manifest, judge=judge)
    if dry_run:
        return _write_folder(files, Path(dry_run))
    results_repo = json.loads(files["leaderboard.json"])["results_repo"]
    _api().create_repo(results_repo, repo_type="dataset", exist_ok=True, private=private_results)
    with tempfile.TemporaryDirectory(prefix="sake-publish-") as tmp:
        upload_space(_write_folder(files, Path(tmp) / "space"), repo_id, "SAKE leaderboard")
    return None


def publish_dataset(repo_id: str, built: str | os.PathLike, dry_run: str | os.PathLike | None = None) -> Path | None:
    """Upload a built dataset folder (``build_splits.py --push-to-hub``); ``dry_run`` copies it instead."""
    built = Path(built)
    if not (built / "sake_manifest.json").is_file():
        raise PublishError(f"{built}: not a built SAKE dataset (no sake_manifest.json); run build_splits.py first")
    _check_repo_id(repo_id)
    if dry_run:
        files = {str(p.relative_to(built)): p.read_bytes() for p in sorted(built.rglob("*")) if p.is_file()}
        return _write_folder(files, Path(dry_run))
    from sake_dataset.release import push_to_hub

    push_to_hub(built, repo_id)
    return None


# ---------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sake publish", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("dataset", help="upload a built SAKE dataset folder as a Hub dataset")
    p.add_argument("repo_id", metavar="ORG/NAME")
    p.add_argument("--from", dest="built", required=True, help="the folder build_splits.py wrote (--out)")
    p = sub.add_parser("metric", help="publish the metric as a Space: evaluate.load('ORG/NAME')")
    p.add_argument("repo_id", metavar="ORG/NAME")
    p = sub.add_parser("leaderboard", help="publish the leaderboard Space, wired to a results dataset repo")
    p.add_argument("repo_id", metavar="ORG/NAME")
    p.add_argument("--results-repo", default=None, help="Hub dataset repo of the results store "
                   "(default ORG/NAME-results; created when missing)")
    p.add_argument("--manifest", default="sake/sake", help="release manifest the Space checks submissions "
                   "against: a Hub dataset id (default %(default)s)")
    p.add_argument("--judge", choices=["paper", "paper+choice", "offline"], default="paper",
                   help="protocol the Space scores with (default %(default)s; paper needs the judge's key)")
    p.add_argument("--private-results", action="store_true",
                   help="create the results dataset repo private (submitted predictions not public)")
    for p in sub.choices.values():
        p.add_argument("--dry-run", metavar="DIR", default=None,
                       help="write the folder that would be uploaded into DIR and upload nothing")
    return parser


@user_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.what == "metric":
        out = publish_metric(args.repo_id, args.dry_run)
    elif args.what == "leaderboard":
        out = publish_leaderboard(args.repo_id, args.results_repo, manifest=args.manifest, judge=args.judge,
                                  dry_run=args.dry_run, private_results=args.private_results)
    else:
        out = publish_dataset(args.repo_id, args.built, args.dry_run)
    if out is not None:
        print(f"wrote {out} (dry run: nothing uploaded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
