"""The method suite: every registered method x every tiny model family, so a new method gets these tests by being
registered (``editors/<name>.py`` + ``editors/hparams/<name>.yaml``); its own test file keeps only what is
particular to it.

For each (method, family):

* an edit changes the target answer, inside an edit session (``editors/session.py``), precisely:

  - the edit reaches the edit prompt: the next-token logits at the end of the (rewritten) edit prompt differ from
    the unedited model's;
  - a method that changes the model (``Editor.changes_parameters``: weights, replaced modules, side memories,
    codebooks) makes the target more likely: its teacher-forced loss on the edit prompt drops, or the log-probability
    of its first token after the prompt rises (what the first decoding step sees: GRACE's codebook decides at the
    last prompt token of the prefill, which a teacher-forced pass never has as its last position);
  - a method whose edit lives in the prompt (I-IKE, IE-IKE) states the edit's target in the prompt it rewrites;

* restore is bit-exact: parameters, module tree and hooks equal the unedited model's after the edit block, and
  after a runner run (in sequential mode that is after a sequence of accumulated edits);
* single and sequential runs go through the runner (``editors.run.Runner``): the strict reader accepts the file
  with the release manifest, every row has a post-edit output, the sequential run evaluates its first edit at gap 0
  and again at gap 1, after the second edit was applied on top of it; a method that batches edits
  (``Editor.batches_edits``) runs the single check as two instances in one pass (``edits_per_pass=2``: its
  ``apply_many`` / ``generate_many`` path);
* resume keeps rows identical: the sequential file cut inside its last unit (half its rows and a partial line, as
  a kill leaves it) and run again has the same bytes as the uninterrupted file (the first edit is replayed without
  being evaluated again, the cut unit redone).

Fast by construction: tiny models, one instance (single) or one sequence of two evaluated steps, 3 new tokens, a
pre-edit cache and AlphaEdit statistics shared per family, and fewer optimisation steps than the YAML's ``tiny``
sections (``FAST``: the suite checks that an edit moves the target, not that it converges). KE / MEND (any method
whose hyperparameters name a ``hypernetwork_path``) get a hypernetwork trained on the demo train split first (for
the families after the first, one step on one instance).
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from _editor_helpers import run_config
from _methods_helpers import (TINY_MODELS, assert_same_state, context, demo_dataset, edit_request, hparams,
                              load_train_split, model_state, session_tmp, tiny_adapter, trained_network)
from editors.predictions import read_predictions
from editors.registry import available_methods, get_editor_class
from editors.run import Runner
from editors.session import EditSession
from eval.sake_metric.predictions_file import read_predictions_file

FAMILIES = TINY_MODELS
METHODS = tuple(available_methods())

#: Speed knobs per method (keys its YAML defines): a few optimisation steps, small prompt sets. A method not named
#: here runs with its YAML's ``tiny`` section.
FAST: dict[str, dict[str, Any]] = {
    "ft_llm": {"max_steps": 3}, "ft_audio": {"max_steps": 3}, "ft_encoder": {"max_steps": 3},
    "lora": {"max_steps": 3}, "grace": {"n_iter": 3},
    "unke": {"v_steps": 3, "optim_steps": 3, "preserve_text": 1, "preserve_audio": 1},
    "wise": {"n_iter": 3, "preserve_text": 1, "preserve_audio": 1},
    "alphaedit": {"v_num_grad_steps": 3, "preserve_audio": 2, "preserve_text": 1},
    "ie_ike": {"demo_generality": 0, "demo_locality_audio": 0, "demo_locality_text": 0},
}


@functools.lru_cache(maxsize=None)
def shared_adapter(family: str):
    """One tiny model per family for the whole suite, so that its audio-state caches (and DeSTA2.5's Whisper
    transcripts) are computed once. Every test checks that it leaves the model bit-exactly as it found it."""
    return tiny_adapter(family)


@functools.lru_cache(maxsize=None)
def overrides(method: str, family: str) -> dict[str, Any]:
    """``FAST`` plus, for a method that applies a trained hypernetwork, where one trained for ``family`` is (on the
    demo train split: 2 instances per config for the first family, the network tests/test_train.py checks; one
    step on one instance for the others)."""
    out = dict(FAST.get(method, {}))
    if "hypernetwork_path" in get_editor_class(method).hparams_class.field_names():
        if family == FAMILIES[0]:
            out["hypernetwork_path"] = str(trained_network(method, family))
        else:
            from editors.train import Trainer

            adapter = shared_adapter(family)
            path = session_tmp() / "suite-hypernetworks" / method / family
            # one instance, so no validation split (val_size 0: the last network)
            Trainer(adapter, method, hparams(method, adapter, val_size=0), {"emotion": load_train_split()["emotion"]},
                    path, seed=0, model_name=family, limit=1, checkpoint_every=100, progress=False).train()
            out["hypernetwork_path"] = str(path)
    return out


def family_cache(family: str) -> Path:
    """The cache folder of one family (pre-edit outputs, AlphaEdit statistics), shared by every method."""
    return session_tmp() / "suite-cache" / family


def _first_token_logp(adapter, prompts, target: str) -> tuple[torch.Tensor, float]:
    """The next-token log-probabilities at the end of the one prompt and that of the target's first token."""
    with torch.no_grad():
        logits = adapter.logits_from(adapter.hidden_entering(adapter.prepare(prompts), 0))[0, -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp, float(logp[adapter.target_token_ids(target)[0]])


# ---- an edit, in an edit session --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_an_edit_changes_the_target_answer_and_restore_is_bit_exact(method, family):
    adapter = shared_adapter(family)
    train = load_train_split()
    session = EditSession.start(adapter, method, hparams(method, adapter, **overrides(method, family)),
                                context(cache_dir=str(family_cache(family)), model_name=family,
                                        load_rows=lambda config, split: train[config]))
    editor = session.editor
    edit = edit_request(target="sad")
    state = model_state(adapter)
    logp_before, first_before = _first_token_logp(adapter, [edit.prompt()], edit.target)
    loss_before = float(adapter.target_loss([edit.prompt()], [edit.target]))
    with session.edit(edit, seed=0):
        (prompt,) = editor.rewrite_prompts([edit.prompt()], edit)
        logp_after, first_after = _first_token_logp(adapter, [prompt], edit.target)
        loss_after = float(adapter.target_loss([prompt], [edit.target]))
    assert not torch.equal(logp_after, logp_before), "the edit does not reach the edit prompt"
    if editor.changes_parameters:
        assert loss_after < loss_before or first_after > first_before, \
            f"target not more likely: loss {loss_before:.4f} -> {loss_after:.4f}, first token {first_before:.4f} " \
            f"-> {first_after:.4f}"
    else:
        assert edit.target_label in _stated(prompt) and prompt.question == edit.question
    assert_same_state(adapter, state)
    (unedited,) = editor.rewrite_prompts([edit.prompt()], edit)
    assert edit.target_label not in _stated(unedited)  # no edit state left in the method either


def _stated(prompt) -> str:
    """The text a prompt method adds around the question: system prompt and earlier turns."""
    return " ".join([prompt.system or ""] + [f"{turn.question} {turn.answer}" for turn in prompt.history])


# ---- runs through the runner, restore, resume -------------------------------------------------------------------


def _run(method: str, family: str, mode: str, out: Path, adapter, edits_per_pass: int = 1) -> Path:
    """``edits_per_pass`` instances in one pass (single) or the first sequence, edits 1 and 2, edit 1 evaluated at
    gaps 0 and 1 (sequential)."""
    extra = ({"configs": ("gender",), "limit": edits_per_pass, "edits_per_pass": edits_per_pass}
             if mode == "single" else {"limit": 1, "eval_edits": 1, "max_gap": 1})
    config = run_config(demo_dataset(), out, family_cache(family), model=family, method=method, mode=mode,
                        max_new_tokens=3, hparams=overrides(method, family), **extra)
    runner = Runner(config, adapter=adapter)
    assert runner.edits_per_pass == edits_per_pass  # a batching method's instances share one pass
    return runner.run()


def _batches(method: str, family: str) -> bool:
    """True when the method applies several edits in one pass (``Editor.batches_edits``) with the suite's
    hyperparameters."""
    cls = get_editor_class(method)
    editor = cls(shared_adapter(family), hparams(method, shared_adapter(family), **overrides(method, family)))
    return bool(editor.batches_edits)


def _checked_rows(path: Path, method: str, mode: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, rows) of a complete predictions file (the strict reader with the release manifest)."""
    manifest = json.loads((demo_dataset() / "sake_manifest.json").read_text())
    complete = read_predictions_file(path, manifest=manifest)  # refuses a file missing any expected row
    header, rows = read_predictions(path)
    assert header["method"] == method and header["mode"] == mode and header["expected_rows"] == len(rows)
    assert len(complete.rows) == len(rows) and all(r["post_edit"] is not None for r in rows)
    return header, rows


def _cut_inside_the_last_unit(path: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """What a kill while writing the last step of a sequence leaves: half its rows and a partial line."""
    last = [i for i, r in enumerate(rows) if (r["instance_id"], r["gap"]) == (rows[-1]["instance_id"],
                                                                              rows[-1]["gap"])]
    keep = rows[:last[0] + len(last) // 2]
    lines = [json.dumps(header, ensure_ascii=False)] + [json.dumps(r, ensure_ascii=False) for r in keep]
    path.write_text("\n".join(lines) + "\n" + json.dumps(rows[-1])[:25], encoding="utf-8")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_runs_go_through_the_runner_restore_the_model_and_resume_identically(method, family, tmp_path):
    adapter = shared_adapter(family)
    state = model_state(adapter)

    k = 2 if _batches(method, family) else 1  # a method that batches edits: its K-per-pass path, two edits
    single = _run(method, family, "single", tmp_path / "single.jsonl", adapter, edits_per_pass=k)
    assert_same_state(adapter, state)  # the edit(s) restored bit-exactly
    _, rows = _checked_rows(single, method, "single")
    assert {r["gap"] for r in rows} == {None} and len({r["instance_id"] for r in rows}) == k

    sequential = _run(method, family, "sequential", tmp_path / "sequential.jsonl", adapter)
    assert_same_state(adapter, state)  # both edits of the sequence undone together
    header, rows = _checked_rows(sequential, method, "sequential")
    assert [(r["gap"], r["instance_id"]) for r in rows if r["dimension"] == "reliability"] == \
        [(0, rows[0]["instance_id"]), (1, rows[0]["instance_id"])]

    resumed = tmp_path / "resumed.jsonl"
    _cut_inside_the_last_unit(resumed, header, rows)
    assert _run(method, family, "sequential", resumed, adapter) == resumed
    assert resumed.read_bytes() == sequential.read_bytes()  # header (its date kept) and every row
    assert_same_state(adapter, state)


# ---- adding a method that needs a new model capability ----------------------------------------------------------

TOY_METHOD = '''"""A toy method that needs a model capability no adapter had: the LLM's input token embeddings."""
from dataclasses import dataclass
from typing import Any

import torch

from editors.base import EditRequest, Editor
from editors.hparams import Hparams
from editors.registry import register


@dataclass
class ToyEmbedHparams(Hparams):
    scale: float


@register("toy_embed")
class ToyEmbed(Editor):
    """Scales the input embedding of the target's first token."""

    hparams_class = ToyEmbedHparams
    hparams: ToyEmbedHparams
    display_name = "Toy (embedding)"
    display_order = 50.0

    def touched_parameters(self) -> list[str]:
        return self.adapter.parameter_names(self.adapter.token_embedding())

    def apply(self, edit: EditRequest) -> dict[str, Any]:
        target_ids = self.adapter.prepare([edit.prompt()], [edit.target]).target_ids
        assert target_ids is not None
        token = int(target_ids[0])
        with torch.no_grad():
            self.adapter.token_embedding().weight[token] *= self.hparams.scale
        return {"steps": 1, "token": token}
'''

TOY_YAML = "defaults:\n  scale: 3.0\nqwen2_audio: {}\naudio_flamingo3: {}\ndesta25: {}\ntiny: {}\n"

#: The capability, added to the adapter base with a default that serves every family, and declared in the interface
#: methods see (``editors.models.interface.EditableModel``, which the type checker holds them to).
TOY_CAPABILITY = '''
    def token_embedding(self) -> nn.Module:
        """The LLM's input token embedding (nn.Embedding)."""
        return self.language_model().get_input_embeddings()
'''
TOY_DECLARATION = '''
    def token_embedding(self) -> nn.Module: ...
'''

TOY_RUN = '''
import json, sys
from editors.config import RunConfig
from editors.run import Runner

dataset, out, cache, *models = sys.argv[1:]
for model in models:
    path = Runner(RunConfig(model=model, method="toy_embed", dataset=dataset, out=out, configs=("gender",), limit=1,
                            max_new_tokens=2, cache_dir=cache, progress=False)).run()
    header, *rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert header["method_display_name"] == "Toy (embedding)" and len(rows) == header["expected_rows"] > 0
    assert all(r["post_edit"] is not None for r in rows)
    print(model, header["family"], len(rows))
'''


def _tree_digest(root: Path) -> dict[str, str]:
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def test_a_method_needing_a_new_model_capability_touches_its_module_its_yaml_and_the_adapter_base(tmp_path):
    """In a copy of the two floors a method needs (``sake_core``, ``editors``: ARCHITECTURE.md "Floors"), a toy
    method using a capability added to ``LALMAdapter`` with a default implementation (and declared in the interface
    methods see) runs through the runner for every family; the only files that differ from the checkout are its
    module, its YAML, the adapter base and the interface."""
    import shutil
    import subprocess
    import sys

    from editors.models.adapter import LALMAdapter

    assert not hasattr(LALMAdapter, "token_embedding")  # a capability the adapters do not have yet
    repo = Path(__file__).resolve().parent.parent
    tree = tmp_path / "tree"
    tracked = subprocess.run(["git", "ls-files", "sake_core", "editors"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, tree / name)
    before = _tree_digest(tree)

    (tree / "editors" / "toy_embed.py").write_text(TOY_METHOD, encoding="utf-8")
    (tree / "editors" / "hparams" / "toy_embed.yaml").write_text(TOY_YAML, encoding="utf-8")
    adapter = tree / "editors" / "models" / "adapter.py"
    source = adapter.read_text(encoding="utf-8")
    start = source.index("class LALMAdapter(")
    end = re.compile(r"\n+(?=\S)").search(source, start).start()  # the class body ends at the next top-level line
    adapter.write_text(source[:end] + "\n" + TOY_CAPABILITY.rstrip("\n") + source[end:], encoding="utf-8")
    interface = tree / "editors" / "models" / "interface.py"
    interface.write_text(interface.read_text(encoding="utf-8").rstrip("\n") + "\n" + TOY_DECLARATION,
                         encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if not k.startswith("SAKE_")}
    env["PYTHONPATH"] = str(tree)
    proc = subprocess.run([sys.executable, "-c", TOY_RUN, str(demo_dataset()), str(tmp_path / "runs"),
                           str(tmp_path / "cache"), *FAMILIES], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split()[0] for line in proc.stdout.splitlines()] == list(FAMILIES)

    after = _tree_digest(tree)
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    assert changed == {"editors/toy_embed.py", "editors/hparams/toy_embed.yaml", "editors/models/adapter.py",
                       "editors/models/interface.py"}
