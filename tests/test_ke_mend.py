"""KE and MEND editors (editors/ke.py, editors/mend.py), what is particular to them: a trained hypernetwork's edit
gives the target on the layers it names, and a clear error without one. (Every method's edit, restore, runner and
resume: tests/test_methods.py.)"""

from __future__ import annotations

import pytest
import torch

from _methods_helpers import (assert_same_state, context, edit_request, hparams, model_state, tiny_adapter,
                              trained_network)
from editors.registry import get_editor_class
from editors.session import EditSession


@pytest.mark.parametrize("method", ["ke", "mend"])
def test_trained_hypernetwork_edit_gives_the_target_and_restores_exactly(method):
    adapter = tiny_adapter("tiny-qwen2-audio")
    editor = get_editor_class(method)(adapter, hparams(method, adapter,
                                                       hypernetwork_path=str(trained_network(method))), context())
    editor.setup()
    touched = editor.touched_parameters()
    edited = {adapter.module_name(adapter.llm_linear(layer, role)) + ".weight"
              for layer in (1, 2, 3) for role in ("mlp_up", "mlp_out")}
    assert set(touched) == edited
    state = model_state(adapter)
    session = EditSession(editor)
    for target, audio_seed in (("sad", 1), ("dog", 7)):
        edit = edit_request(target=target, audio_seed=audio_seed)
        before = adapter.generate([edit.prompt()], max_new_tokens=8)[0]
        assert before != target
        with session.edit(edit) as stats:
            assert adapter.generate([edit.prompt()], max_new_tokens=8) == [target]
            assert stats["steps"] == 1 and all(stats[f"delta_norm.{layer}_{role}"] > 0
                                               for layer in (1, 2, 3) for role in ("mlp_up", "mlp_out"))
            # the network's training time (editors.train) rides along for the runner's .timing.json / Table 7
            assert stats["hypernetwork_train_s"] == editor.network_config["train_seconds"] > 0
            changed = {n for n, p in adapter.model.named_parameters() if not torch.equal(p, state["params"][n])}
            assert changed == edited
        assert_same_state(adapter, state)


@pytest.mark.parametrize("method", ["ke", "mend"])
def test_editing_without_a_trained_hypernetwork_is_a_clear_error(method, tmp_path):
    adapter = tiny_adapter("tiny-qwen2-audio")
    editor = get_editor_class(method)(adapter, hparams(method, adapter),
                                      context(cache_dir=str(tmp_path), model_name="tiny-qwen2-audio"))
    with pytest.raises(ValueError, match=f"no trained hypernetwork.*python -m editors.train --method {method}"):
        editor.setup()
    other = "mend" if method == "ke" else "ke"
    editor = get_editor_class(method)(adapter, hparams(method, adapter,
                                                       hypernetwork_path=str(trained_network(other))), context())
    with pytest.raises(ValueError, match=f"'{other}' hypernetwork"):
        editor.setup()



# EasyEdit's settings (hparams/TRAINING/MEND/qwen2vl-7b.yaml and the KE files): the up and down projections of the
# paper's three layers (Table 6), named through the adapter. Each family's tiny model is built with the real
# model's number of LLM layers, so that the layer numbers resolve as they do on the real checkpoint.
REAL_LAYERS = {"qwen2_audio": (32, [29, 30, 31]), "audio_flamingo3": (28, [25, 26, 27]),
               "desta25": (32, [29, 30, 31])}
TINY_NAMES = {"qwen2_audio": "tiny-qwen2-audio", "audio_flamingo3": "tiny-audio-flamingo3",
              "desta25": "tiny-desta25"}


@pytest.mark.parametrize("family", sorted(REAL_LAYERS))
@pytest.mark.parametrize("method", ["ke", "mend"])
def test_edited_matrices_are_the_up_and_down_projections_of_the_papers_layers(method, family):
    from editors.hypernetwork import model_spec
    from editors.models.registry import adapter_class
    from editors.registry import load_hparams

    n_layers, layers = REAL_LAYERS[family]
    adapter = adapter_class(family).tiny(seed=0, num_layers=n_layers)
    hp = load_hparams(method, family)
    assert hp.layers == layers and hp.roles == ["mlp_up", "mlp_out"]
    spec = model_spec(adapter, hp.layers, hp.roles)
    assert spec["matrices"] == [f"{layer}_{role}" for layer in layers for role in ("mlp_up", "mlp_out")]
    editor = get_editor_class(method)(adapter, hp, context())
    names = editor.touched_parameters()
    suffixes = [f"layers.{layer}.mlp.{proj}.weight" for layer in layers for proj in ("up_proj", "down_proj")]
    assert len(names) == 6 and all(n.endswith(s) for n, s in zip(names, suffixes)), names
    assert set(names) <= set(adapter.named_parameter_dict())


def test_mend_shares_one_editor_network_per_matrix_shape_with_a_scale_and_shift_per_matrix():
    from editors.hypernetwork import Factors, build_network

    adapter = tiny_adapter("tiny-qwen2-audio")  # hidden 128, FFN 256: up [256, 128], down [128, 256]
    shared = build_network("mend", adapter, hparams("mend", adapter), seed=0)
    assert shared.net["shared"] is True
    assert sorted(shared.editors) == ["128x256", "256x128"]
    assert {key: shared.routes[key] for key in ("1_mlp_up", "3_mlp_up", "2_mlp_out")} == \
        {"1_mlp_up": ("256x128", 0), "3_mlp_up": ("256x128", 2), "2_mlp_out": ("128x256", 1)}
    assert shared.edit_lrs.shape == (6,)  # one learned step size per matrix
    separate = build_network("mend", adapter, hparams("mend", adapter, shared=False), seed=0)
    assert sorted(separate.editors) == sorted(separate.matrices) and len(separate.editors) == 6

    shared.eval()  # running normalisation statistics frozen: both calls below see the same inputs
    generator = torch.Generator().manual_seed(0)
    factors = {}
    for key in shared.matrices:
        d_out, d_in = shared.shape(key)
        factors[key] = Factors(u=torch.randn(5, d_in, generator=generator), g=torch.randn(5, d_out, generator=generator))
    with torch.no_grad():
        for block in shared.editors["256x128"].blocks:  # a non-zero residual branch, so that modes matter
            block.up.weight.normal_(std=0.1, generator=generator)
        before = shared.deltas(factors)
        for block in shared.editors["256x128"].blocks:
            block.mode_shift[1] += 0.5  # the second up projection's (layer 2) own shift
        after = shared.deltas(factors)
    changed = {key for key in shared.matrices if not torch.equal(before[key], after[key])}
    assert changed == {"2_mlp_up"}


def test_a_rerun_after_retraining_the_hypernetwork_is_refused_not_mixed(demo_dataset, tmp_path):
    """The run header records the network's digest (`method_state`): the same network resumes the file, a
    retrained one (same folder) is refused instead of appending rows that another network's edits produced."""
    import json
    import shutil

    from _editor_helpers import run_config
    from sake import run as api_run
    from sake_core.errors import DataError

    network = tmp_path / "network"
    shutil.copytree(trained_network("ke"), network)
    config = run_config(demo_dataset, tmp_path / "ke.jsonl", tmp_path / "cache", method="ke", limit=1,
                        configs=("gender",), hparams={"hypernetwork_path": str(network)})
    path = api_run(config)
    header = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert isinstance(header["method_state"], str) and len(header["method_state"]) == 64
    size = path.stat().st_size
    assert api_run(config) == path and path.stat().st_size == size  # the same network: nothing to redo
    shutil.rmtree(network)
    shutil.copytree(trained_network("ke", limit=3), network)  # retrained on more instances, same folder
    with pytest.raises(DataError, match="different run.*method_state"):
        api_run(config)
    assert path.stat().st_size == size


def test_a_network_found_by_model_name_but_trained_on_other_weights_is_refused(tmp_path):
    """`tiny-qwen2-audio` names both seeds' models: the network in its default folder was trained on seed 0's
    weights (its model key), so seed 1's model refuses it unless it is named explicitly."""
    import shutil

    from editors.hypernetwork import default_hypernet_dir
    from sake_core.errors import DataError

    shutil.copytree(trained_network("ke"), default_hypernet_dir(tmp_path, "ke", "tiny-qwen2-audio"))
    other = tiny_adapter("tiny-qwen2-audio", seed=1)
    editor = get_editor_class("ke")(other, hparams("ke", other),
                                    context(cache_dir=str(tmp_path), model_name="tiny-qwen2-audio"))
    with pytest.raises(DataError, match="not on the weights of"):
        editor.setup()
    same = tiny_adapter("tiny-qwen2-audio")
    get_editor_class("ke")(same, hparams("ke", same),
                           context(cache_dir=str(tmp_path), model_name="tiny-qwen2-audio")).setup()
    named = get_editor_class("ke")(other, hparams("ke", other, hypernetwork_path=str(trained_network("ke"))),
                                   context())
    named.setup()  # named explicitly: used, with a warning


@pytest.mark.parametrize("method, change", [("mend", {"rank": 2}), ("ke", {"layers": [-1]})])
def test_a_run_giving_other_network_shapes_than_the_trained_ones_is_refused(method, change):
    """The run header's hparams describe the network applied: a run naming other layers or sizes than the network
    was trained with is an error, not a silent use of the trained ones."""
    from sake_core.errors import ConfigError

    adapter = tiny_adapter("tiny-qwen2-audio")
    editor = get_editor_class(method)(adapter, hparams(method, adapter, hypernetwork_path=str(trained_network(method)),
                                                       **change), context())
    with pytest.raises(ConfigError, match=f"the network was trained with {next(iter(change))}="):
        editor.setup()
