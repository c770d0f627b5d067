"""Command line of the SAKE leaderboard: ``python -m eval.leaderboard COMMAND --help``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import zipfile
from pathlib import Path

from eval.sake_metric.scoring import default_protocol
from sake_core.errors import ConfigError, error_prefix, user_errors
from sake_core.command import command_prog

from .validate import DEFAULT_MAX_BYTES, DEFAULT_SPLITS, METADATA_NAME, PREDICTIONS_NAME, SubmissionError

logger = logging.getLogger("eval.leaderboard")


def _add_manifest_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", required=True,
                        help="sake_manifest.json, the dataset directory holding it, or a Hub dataset id (sake/sake)")
    parser.add_argument("--manifest-revision", default=None, help="Hub revision of the dataset (Hub ids only)")
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_BYTES / 2**20,
                        help="size limit of a submission in MiB (default %(default)s)")
    parser.add_argument("--split", action="append", default=None,
                        help=f"split(s) the board accepts (default: {', '.join(DEFAULT_SPLITS)}); repeatable")


def _add_judge_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--judge", choices=["paper", "paper+choice", "offline", "openai"], default=None,
                        help="paper: the paper's protocol, deterministic stages first and the LLM judge for the "
                             "rest (API key from the environment; 'openai' is an alias); paper+choice: the same "
                             "with the multiple-choice prefilter; offline: deterministic stages only, labelled "
                             "'offline' on the board and never ranked among paper rows (default: paper when "
                             "OPENAI_API_KEY is set, else offline)")
    parser.add_argument("--judge-cache", default=None, help="directory of the LLM judge's on-disk cache")
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible server for the judge")
    parser.add_argument("--judge-model", default=None, help="judge model (default: the metric's default)")


def _judge_options(args: argparse.Namespace) -> dict:
    return {"cache_dir": args.judge_cache, "base_url": args.base_url, "model": args.judge_model}


def _validate_options(args: argparse.Namespace) -> dict:
    return {"max_bytes": int(args.max_mb * 2**20), "allowed_splits": tuple(args.split or DEFAULT_SPLITS)}


def _manifest(args: argparse.Namespace) -> dict:
    from .validate import load_manifest

    return load_manifest(args.manifest, revision=args.manifest_revision)


def cmd_validate(args: argparse.Namespace) -> int:
    from .validate import validate_submission

    submission = validate_submission(args.submission, _manifest(args), metadata_path=args.metadata,
                                     require_metadata=not args.predictions_only, **_validate_options(args))
    header = submission.header
    print(f"OK {args.submission}: {header['model']} / {header['method']} / {header['mode']}, "
          f"{len(submission.rows)} rows, content id {submission.submission_id} (the id `add` gives its board entry "
          "also names the judging, so the two differ)")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from .validate import parse_submission

    files = {PREDICTIONS_NAME: Path(args.predictions).read_bytes(), METADATA_NAME: Path(args.metadata).read_bytes()}
    parse_submission(files, source=args.predictions)  # refuse to pack something the board would reject
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in (PREDICTIONS_NAME, METADATA_NAME):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))  # fixed time: byte-identical zips
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name])
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .store import board_id, board_result, dump_json, score_submission
    from .validate import validate_submission

    manifest = _manifest(args)
    submission = validate_submission(args.submission, manifest, **_validate_options(args))
    result = board_result(submission, score_submission(submission, judge=args.judge, manifest=manifest,
                                                       **_judge_options(args)),
                          submission_id=board_id(submission.submission_id, args.judge, **_judge_options(args)))
    data = dump_json(result)
    if args.out:
        from sake_core.atomic import atomic_write

        atomic_write(Path(args.out), data)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(data.decode("utf-8"))
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from .store import add_submission, open_store

    store = open_store(args.results, args.hub_repo)
    outcome = add_submission(args.submission, _manifest(args), store, judge=args.judge,
                             validate_options=_validate_options(args), **_judge_options(args))
    print(f"{outcome.status} {outcome.submission_id}")
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    from .store import open_store, process_queue

    store = open_store(args.results, args.hub_repo)
    for name, outcome in process_queue(args.queue, _manifest(args), store, judge=args.judge,
                                       validate_options=_validate_options(args), **_judge_options(args)):
        print(f"{name}: {outcome}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .build import build_site

    results_dir = args.results_dir
    if args.hub_repo:
        from huggingface_hub import snapshot_download

        results_dir = snapshot_download(args.hub_repo, repo_type="dataset", allow_patterns=["results/*.json"])
    out = build_site(results_dir, args.out, include_reference=not args.no_reference)
    print(f"built {out / 'index.html'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve_forever

    serve_forever(args.site_dir, args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=command_prog("python -m eval.leaderboard"), description=__doc__,
                                     epilog="Every command but build and serve needs the [leaderboard] extra: "
                                            "pip install 'sake-toolkit[leaderboard]'")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a submission (directory, .zip, or a bare predictions .jsonl)")
    p.add_argument("submission")
    p.add_argument("--metadata", default=None, help="metadata.json for a bare predictions .jsonl")
    p.add_argument("--predictions-only", action="store_true", help="do not require metadata.json")
    _add_manifest_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("pack", help="make a submission .zip from a predictions .jsonl and a metadata.json")
    p.add_argument("predictions")
    p.add_argument("--metadata", required=True)
    p.add_argument("--out", required=True, help="the .zip to write")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("score", help="validate and score a submission; print or write its results JSON")
    p.add_argument("submission")
    p.add_argument("--out", default=None, help="write the results JSON here (default: stdout)")
    _add_manifest_args(p)
    _add_judge_args(p)
    p.set_defaults(func=cmd_score)

    for name, helptext in (("add", "validate, score and store one submission (idempotent)"),
                           ("queue", "add every submission in QUEUE/pending, moving it to done/ or rejected/")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("queue" if name == "queue" else "submission")
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("--results", help="local results directory")
        target.add_argument("--hub-repo", help="Hub dataset repo for results (token from HF_TOKEN)")
        _add_manifest_args(p)
        _add_judge_args(p)
        p.set_defaults(func=cmd_add if name == "add" else cmd_queue)

    p = sub.add_parser("build", help="build the static board from a results directory")
    p.add_argument("results_dir", nargs="?", default=None)
    p.add_argument("--hub-repo", default=None, help="read results from this Hub dataset repo instead")
    p.add_argument("--out", required=True, help="site directory to write (replaced as a whole)")
    p.add_argument("--no-reference", action="store_true", help="leave out the paper's reference rows")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("serve", help="serve a built site directory over HTTP")
    p.add_argument("site_dir")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)
    return parser


@user_errors
def main(argv: list[str] | None = None) -> int:
    """Exit 1: a submission is INVALID (its problems listed); 2: any other user-facing error (one line); 3: the judge
    failed (no API key, server unreachable, too many failed items). Anything else is a bug (traceback)."""
    from eval.sake_metric.llm_judge import JudgeError
    from eval.sake_metric.predictions_file import PredictionsError
    from eval.sake_metric.scoring import JudgeFailures

    args = build_parser().parse_args(argv)
    if getattr(args, "judge", "unset") is None:
        args.judge = default_protocol()  # "paper" with OPENAI_API_KEY set, else "offline"
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.command not in ("build", "serve"):  # they read stored results; the others check submissions
        import jsonschema  # noqa: F401  (the [leaderboard] extra: a missing one is named before any other error)
    if args.command == "build" and not (args.results_dir or args.hub_repo):
        raise ConfigError("build: give RESULTS_DIR or --hub-repo")
    try:
        return args.func(args)
    except SubmissionError as exc:
        print(f"INVALID {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, json.JSONDecodeError, PredictionsError) as exc:  # unreadable input files
        print(f"{error_prefix()}error: {exc}", file=sys.stderr)
        return 2
    except (JudgeError, JudgeFailures) as exc:
        print(f"judge error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
