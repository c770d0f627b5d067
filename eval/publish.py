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
  under the name ``evaluate.load("ORG/NAME")`` fetches), its helper modules, ``app.py`` (``eval/metric_space.py``:
  upload a predictions JSONL, read the scores; it loads ``NAME.py`` with ``evaluate.load``, named in
  ``metric_space.json``), a ``requirements.txt`` and the metric card whose metadata (``sdk``, ``sdk_version``,
  ``app_file``) is set through ``huggingface_hub``'s card API. ``evaluate.load(DIR)`` works on the dry-run folder
  when its last component is NAME;
- **leaderboard**: a Gradio Space (``eval.leaderboard.space``) with its front matter, ``app.py``, a slim
  ``requirements.txt`` (no torch, no transformers), the ``eval`` code it runs, and ``leaderboard.json`` wiring it
  to the results store and the submission requests, two Hub dataset repos (``--results-repo``, default
  ``ORG/NAME-results``; ``--requests-repo``, default ``ORG/NAME-requests``; created when missing). Give the Space
  the secrets ``HF_TOKEN`` (write access to both repos) and the judge's API key.
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
from sake_core.atomic import write_tree

logger = logging.getLogger("eval.publish")

ROOT = Path(__file__).resolve().parents[1]
METRIC_DIR = ROOT / "eval" / "sake_metric"
METRIC_SCRIPT = "sake_metric.py"
#: The metric Space's page: our own Gradio app (evaluate's widget is written for Gradio 3 and drops empty cells).
METRIC_APP = ROOT / "eval" / "metric_space.py"
UPLOAD_GUARD = ROOT / "eval" / "leaderboard" / "upload_guard.py"
METRIC_SETTINGS = "metric_space.json"  # read by the app: the module file and the repo id
#: The Gradio both Spaces run (the version the tests run, requirements.txt; the Spaces' sdk_version).
GRADIO_SDK_VERSION = "6.31.0"
METRIC_SDK_VERSION = LEADERBOARD_SDK_VERSION = GRADIO_SDK_VERSION
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
METRIC_REQUIREMENTS = ["evaluate>=0.4.6", "datasets>=4.0", "openai>=1.60", "tqdm>=4.66", "fastapi"]
LEADERBOARD_REQUIREMENTS = ["huggingface_hub>=0.30", "jsonschema>=4.20", "fastapi", "uvicorn>=0.30", "openai>=1.60",
                            "tqdm>=4.66"]
#: What the leaderboard Space runs: the ground package, the scorer, the metric's modules and the leaderboard (all
#: torch-free; an installed ``sake_core`` carries ``_shipped/``, the wheel's copy of top-level files: left out).
LEADERBOARD_CODE = ("sake_core", "eval/__init__.py", "eval/score.py", "eval/sake_metric", "eval/leaderboard")
CODE_SKIPPED = ("__pycache__", "_shipped")

LEADERBOARD_APP = '''"""The SAKE leaderboard Space: Gradio app, submission queue and item pages (eval/leaderboard/space.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval.leaderboard.space import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
'''

LEADERBOARD_CARD = """
# SAKE leaderboard

Scores of knowledge edits of large audio-language models on the SAKE benchmark (*SAKE: Towards Editing Auditory
Attribute Knowledge of Large Audio-Language Models*). Submit a `.zip` of `predictions.jsonl` (the file
`python -m editors.run` writes) and `metadata.json` on the Submit tab; the board validates it at once, queues it
and scores it itself ({judge} protocol).

Submissions wait in the dataset repo [`{requests_repo}`](https://huggingface.co/datasets/{requests_repo}) (one
archive and one status record each: pending, finished or rejected with its error), so a restart of the Space loses
none; results live in [`{results_repo}`](https://huggingface.co/datasets/{results_repo}). The release manifest
submissions are checked against is `{manifest}`. This Space needs the secrets `HF_TOKEN` (write access to both
repos) and, for the paper protocol, the judge's API key (`OPENAI_API_KEY`). `python app.py --local` runs this
folder with no Hub (`./results`, `./queue`; `SAKE_MANIFEST=DATASET_DIR` to accept submissions).
"""


class PublishError(ConfigError):
    """Bad arguments for publishing (one line)."""


def _check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id):
        raise PublishError(f"repo id {repo_id!r}: expected ORG/NAME (letters, digits, '-', '_', '.')")
    return repo_id


def _write_folder(files: dict[str, bytes], out: Path) -> Path:
    """Write ``files`` (relative path -> bytes) into a fresh folder that replaces ``out`` as a whole."""
    return write_tree(Path(out), files)


# ---------------------------------------------------------------------------------------------- metric

def metric_files(repo_id: str) -> dict[str, bytes]:
    """The metric Space's files: ``NAME.py``, helper modules, ``app.py`` + ``metric_space.json``,
    ``requirements.txt`` and ``README.md`` (the metric card with the Space's metadata)."""
    name = _check_repo_id(repo_id).split("/")[1]
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise PublishError(f"metric repo name {name!r}: evaluate imports NAME.py as a module, so NAME must be a "
                           "Python identifier (e.g. sake/metric)")
    files: dict[str, bytes] = {}
    for path in sorted(METRIC_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        files[f"{name}.py" if path.name == METRIC_SCRIPT else path.name] = path.read_bytes()
    files["README.md"] = metric_card(repo_id).encode("utf-8")
    files["app.py"] = METRIC_APP.read_bytes()
    files["upload_guard.py"] = UPLOAD_GUARD.read_bytes()  # the app's guard of named files and uploads
    files[METRIC_SETTINGS] = (json.dumps({"metric_file": f"{name}.py", "repo_id": repo_id}, indent=1,
                                         sort_keys=True) + "\n").encode("utf-8")
    files["requirements.txt"] = ("\n".join(METRIC_REQUIREMENTS) + "\n").encode("utf-8")
    return files


def metric_card(repo_id: str) -> str:
    """The metric card (``eval/sake_metric/README.md``) as the Space's README: its metadata set through
    ``huggingface_hub``'s card API (Space SDK, version, app file, looks), and its ``metric = evaluate.load(...)``
    line naming ``repo_id``."""
    from huggingface_hub import SpaceCard

    source = METRIC_DIR / "README.md"
    card = SpaceCard(source.read_text(encoding="utf-8"))
    lines = card.text.split("\n")
    usage = [i for i, line in enumerate(lines) if line.startswith("metric = evaluate.load(")]
    if len(usage) != 1:
        raise PublishError(f"{source}: expected exactly one line starting with 'metric = evaluate.load(' (the "
                           f"usage line the card shows with the repo id), found {len(usage)}")
    lines[usage[0]] = f'metric = evaluate.load("{repo_id}")'
    card.text = "\n".join(lines)
    data: Any = card.data  # CardData: the Space's metadata fields are set as attributes
    data.sdk, data.sdk_version, data.app_file = "gradio", METRIC_SDK_VERSION, "app.py"
    data.emoji, data.colorFrom, data.colorTo, data.pinned = "🎧", "indigo", "green", False
    data.license = data.license or "apache-2.0"
    return str(card)


# ---------------------------------------------------------------------------------------------- leaderboard

def _code_files(entries: tuple[str, ...]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for entry in entries:
        path = ROOT / entry
        if path.is_file():
            files[entry] = path.read_bytes()
        elif path.is_dir():
            for item in sorted(path.rglob("*")):
                if item.is_file() and not set(CODE_SKIPPED) & set(item.parts) and item.suffix != ".pyc":
                    files[str(item.relative_to(ROOT))] = item.read_bytes()
    return files


def leaderboard_card(results_repo: str, manifest: str, judge: str, requests_repo: str) -> str:
    """The leaderboard Space's README: metadata through ``huggingface_hub``'s card API, then the body."""
    from huggingface_hub import SpaceCard, SpaceCardData

    data = SpaceCardData(title="SAKE leaderboard", sdk="gradio", sdk_version=LEADERBOARD_SDK_VERSION,
                         app_file="app.py", license="apache-2.0", datasets=[results_repo, requests_repo], emoji="🎧",
                         colorFrom="indigo", colorTo="green", pinned=True,
                         short_description="Editing auditory attribute knowledge of audio-language models")
    body = LEADERBOARD_CARD.format(results_repo=results_repo, manifest=manifest, judge=judge,
                                   requests_repo=requests_repo)
    return str(SpaceCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def leaderboard_files(repo_id: str, results_repo: str | None = None, manifest: str = "sake/sake",
                      judge: str = "paper", queue_interval_s: float = 30.0,
                      requests_repo: str | None = None) -> dict[str, bytes]:
    """The leaderboard Space's files: card, ``app.py``, slim requirements, ``leaderboard.json`` (the results and
    requests repos, manifest, protocol) and the code."""
    _check_repo_id(repo_id)
    results_repo = _check_repo_id(results_repo or f"{repo_id}-results")
    requests_repo = _check_repo_id(requests_repo or f"{repo_id}-requests")
    files = _code_files(LEADERBOARD_CODE)
    files["README.md"] = leaderboard_card(results_repo, manifest, judge, requests_repo).encode("utf-8")
    files["app.py"] = LEADERBOARD_APP.encode("utf-8")
    files["requirements.txt"] = ("\n".join(LEADERBOARD_REQUIREMENTS) + "\n").encode("utf-8")
    config = {"results_repo": results_repo, "requests_repo": requests_repo, "manifest": manifest, "judge": judge,
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
                        private_results: bool = False, requests_repo: str | None = None) -> Path | None:
    """Build the leaderboard Space folder; write it to ``dry_run`` or create the results and requests repos and
    upload.

    ``private_results`` creates both dataset repos private (the submitted predictions are then visible to their
    members only; the Space reads them with its ``HF_TOKEN`` secret)."""
    files = leaderboard_files(repo_id, results_repo, manifest=manifest, judge=judge, requests_repo=requests_repo)
    if dry_run:
        return _write_folder(files, Path(dry_run))
    config = json.loads(files["leaderboard.json"])
    api = _api()
    for dataset_repo in (config["results_repo"], config["requests_repo"]):
        api.create_repo(dataset_repo, repo_type="dataset", exist_ok=True, private=private_results)
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
    p.add_argument("--requests-repo", default=None, help="Hub dataset repo where submissions wait and keep their "
                   "status (default ORG/NAME-requests; created when missing)")
    p.add_argument("--manifest", default="sake/sake", help="release manifest the Space checks submissions "
                   "against: a Hub dataset id (default %(default)s)")
    p.add_argument("--judge", choices=["paper", "paper+choice", "offline"], default="paper",
                   help="protocol the Space scores with (default %(default)s; paper needs the judge's key)")
    p.add_argument("--private-results", action="store_true",
                   help="create the results and requests dataset repos private (submitted predictions not public)")
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
                                  dry_run=args.dry_run, private_results=args.private_results,
                                  requests_repo=args.requests_repo)
    else:
        out = publish_dataset(args.repo_id, args.built, args.dry_run)
    if out is not None:
        print(f"wrote {out} (dry run: nothing uploaded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
