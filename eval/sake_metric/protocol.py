"""The SAKE protocol in one place: configs, attributes and labels, splits, item kinds and dimensions, the fields
of prediction rows and of the run header, metric keys, the sequential-editing rule, and the display names and
order of methods and model families.

Every part of the toolkit (dataset builder, runner, metric, leaderboard validator, report, board, demo, bench)
imports these names from here. The module is pure data: no imports beyond the standard library, so the metric and
the leaderboard stay free of torch. ``eval/sake_metric/protocol.py`` is a byte-for-byte copy (an ``evaluate``
module must be self-contained); ``tests/test_protocol.py`` checks that the two files are equal.

Paper references (SAKE: Towards Editing Auditory Attribute Knowledge of Large Audio-Language Models): §3.3 and
App. C.1 (attributes, labels, item kinds), §4.2 (sequential editing), Table 2 (method and model order).
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------- dataset configs

SAMPLING_RATE = 16000
ATTRIBUTES: tuple[str, ...] = ("animal", "emotion", "gender", "language")
SEQUENTIAL_CONFIG = "sequential"
CONFIGS: tuple[str, ...] = ATTRIBUTES + (SEQUENTIAL_CONFIG,)
SPLITS: tuple[str, ...] = ("train", "test")
MODES: tuple[str, ...] = ("single", "sequential")

#: Label set of each attribute (App. C.1), in the canonical spelling the whole toolkit uses.
LABELS: dict[str, tuple[str, ...]] = {
    "animal": ("dog", "cat", "pig", "cow", "frog", "hen", "rooster", "sheep", "crow"),
    "emotion": ("happy", "disgust", "sad", "fear", "angry"),
    "gender": ("male", "female"),
    "language": ("English", "German", "Spanish", "French", "Italian", "Chinese", "Japanese", "Korean"),
}

# ------------------------------------------------------------------------------------------ items and dimensions

#: The five evaluation dimensions, in report order.
DIMENSIONS: tuple[str, ...] = ("reliability", "generality", "locality_audio", "locality_text", "portability")
#: Dimensions judged against the reference answer ...
CORRECTNESS_DIMENSIONS: tuple[str, ...] = ("reliability", "generality", "portability")
#: ... and those judged against the unedited model's own answer.
CONSISTENCY_DIMENSIONS: tuple[str, ...] = ("locality_audio", "locality_text")

#: Item kinds in row order; an item id is f"{instance id}/{kind}".
ITEM_KINDS: tuple[str, ...] = ("rel", "gen1", "gen2", "gen3", "loc_audio1", "loc_audio2", "loc_audio3",
                               "loc_audio4", "loc_text", "port")
#: item kind -> (dimension, type): generality types 1-3, audio locality types 1-4, 0 otherwise.
KIND_DIMENSION_TYPE: dict[str, tuple[str, int]] = {
    "rel": ("reliability", 0),
    "gen1": ("generality", 1), "gen2": ("generality", 2), "gen3": ("generality", 3),
    "loc_audio1": ("locality_audio", 1), "loc_audio2": ("locality_audio", 2),
    "loc_audio3": ("locality_audio", 3), "loc_audio4": ("locality_audio", 4),
    "loc_text": ("locality_text", 0),
    "port": ("portability", 0),
}
#: item kind -> dimension.
DIMENSION_OF_KIND: dict[str, str] = {kind: dim for kind, (dim, _) in KIND_DIMENSION_TYPE.items()}
#: Allowed ``type`` values per dimension.
TYPES: dict[str, tuple[int, ...]] = {
    dim: tuple(sorted({t for d, t in KIND_DIMENSION_TYPE.values() if d == dim})) for dim in DIMENSIONS
}
#: Instance-row list columns holding linked items, in row order (each holds the items of the dimension of the
#: same name; the reliability item is the instance row itself).
ITEM_COLUMNS: tuple[str, ...] = ("generality", "locality_audio", "locality_text", "portability")
#: item kind -> the instance-row column holding it (not "rel").
COLUMN_OF_KIND: dict[str, str] = {kind: dim for kind, dim in DIMENSION_OF_KIND.items() if kind != "rel"}

#: Columns of an instance row (attribute configs) and of a sequential row.
INSTANCE_COLUMNS: tuple[str, ...] = ("id", "attribute", "split", "original_label", "target_label", "audio",
                                     "question", "options", "answer") + ITEM_COLUMNS
SEQUENTIAL_COLUMNS: tuple[str, ...] = INSTANCE_COLUMNS + ("sequence_id", "step", "source_instance")
#: Fields of a linked item (a text item has the same fields without ``audio``).
ITEM_FIELDS: tuple[str, ...] = ("id", "type", "question", "options", "answer", "attribute", "label", "category",
                                "source")

# --------------------------------------------------------------------------------------------- predictions file

#: Fields of every prediction row (line 2.. of a predictions JSONL).
ROW_FIELDS: tuple[str, ...] = ("kind", "instance_id", "item_id", "dimension", "type", "attribute", "question",
                               "options", "reference", "pre_edit", "post_edit", "gap", "category")
#: Optional row fields the runner writes: ``post_edit_hit_limit`` / ``pre_edit_hit_limit`` (the post-edit / pre-edit
#: output stopped at ``max_new_tokens`` without a stop token, so its answer may be cut; null when unknown).
OPTIONAL_ROW_FIELDS: tuple[str, ...] = ("post_edit_hit_limit", "pre_edit_hit_limit")
#: The run header (line 1 of a predictions file), one entry per field in the order the runner writes them:
#: (name, required: every predictions file carries it, resume: a rerun must agree on it to continue the file).
#: Besides the required fields the runner writes the method's display name and order, a digest of the trained
#: state it loaded (``method_state``: a hypernetwork's files; null for most methods), the generation length, the
#: generation settings that change outputs (``generation``: engine, max_new_tokens, dtype, min_shared_prefix) and
#: the batching limits (``batching``), which items carry a pre-edit output (``pre_edit_items``: one of
#: :data:`PRE_EDIT_ITEMS`), the number of rows of the complete run (``expected_rows``: a reader refuses a file with
#: fewer), the pre-edit cache key, dtype, family, the sequential rule the file follows (``eval_edits``,
#: ``max_gap``; null in single mode) and the date.
RUN_HEADER: tuple[tuple[str, bool, bool], ...] = (
    ("kind", True, False),
    ("model", True, True),
    ("model_revision", True, True),
    ("method", True, True),
    ("method_display_name", False, False),
    ("method_display_order", False, False),
    ("hparams", True, True),
    ("method_state", False, True),
    ("mode", True, True),
    ("dataset", True, True),
    ("dataset_fingerprint", True, True),
    ("configs", True, True),
    ("split", True, True),
    ("seed", True, True),
    ("limit", False, True),
    ("max_new_tokens", False, True),
    ("generation", False, True),
    ("batching", False, False),
    ("pre_edit_items", False, True),
    ("expected_rows", False, False),
    ("model_key", False, True),
    ("dtype", False, False),
    ("family", False, False),
    ("eval_edits", False, True),
    ("max_gap", False, True),
    ("versions", True, False),
    ("date", False, False),
)
#: Header fields every predictions file carries.
HEADER_FIELDS: tuple[str, ...] = tuple(name for name, required, _ in RUN_HEADER if required)
#: Every header field the runner writes, in order.
RUN_HEADER_FIELDS: tuple[str, ...] = tuple(name for name, _, _ in RUN_HEADER)
#: Header fields that must agree for a rerun to resume into an existing file (or part file).
RESUME_FIELDS: tuple[str, ...] = tuple(name for name, _, resume in RUN_HEADER if resume)
#: How the method is shown and where it sorts (its class's ``display_name`` / ``display_order``; the paper's
#: eight: their Table 2 names and places). The runner writes them, the results copy them, and reports and the
#: board read them from there (:func:`method_display`), so a method outside the paper shows by its name on a
#: board that does not ship the method's code.
DISPLAY_FIELDS: tuple[str, ...] = ("method_display_name", "method_display_order")

#: Which items a run generates the unedited model's output for (the header's ``pre_edit_items``): ``locality``, the
#: items whose score reads it (:data:`CONSISTENCY_DIMENSIONS`: the paper judges locality against the unedited
#: model's answer and everything else against the reference; the other rows carry ``pre_edit: null``), or ``all``.
PRE_EDIT_ITEMS: tuple[str, ...] = ("locality", "all")


def needs_pre_edit(dimension: str, pre_edit_items: str = "locality") -> bool:
    """Whether a row of ``dimension`` carries a pre-edit output under the header's ``pre_edit_items``."""
    return pre_edit_items == "all" or dimension in CONSISTENCY_DIMENSIONS


# ------------------------------------------------------------------------------------------- sequential editing

#: §4.2: after each edit t of a sequence, edits s <= SEQUENTIAL_EVAL_EDITS are evaluated at gap t - s, for gaps
#: 0..SEQUENTIAL_MAX_GAP.
SEQUENTIAL_EVAL_EDITS = 5
SEQUENTIAL_MAX_GAP = 5


def sequential_evaluated(step: int, length: int, eval_edits: int = SEQUENTIAL_EVAL_EDITS,
                         max_gap: int = SEQUENTIAL_MAX_GAP) -> list[int]:
    """Edits ``s`` evaluated after step ``step`` of a sequence of ``length`` edits: ``s <= eval_edits``,
    ``s <= length`` and ``0 <= step - s <= max_gap``."""
    return [s for s in range(1, min(step, eval_edits, length) + 1) if step - s <= max_gap]


# ------------------------------------------------------------------------------------------------------ metrics

#: Keys of one metrics block ``M`` of a results JSON (values in percent or null).
METRIC_KEYS: tuple[str, ...] = (
    "reliability", "generality", "generality_type1", "generality_type2", "generality_type3",
    "locality_audio", "locality_audio_type1", "locality_audio_type2", "locality_audio_type3",
    "locality_audio_type4", "locality_text", "portability",
)

# ------------------------------------------------------------------------------------ methods and model families

#: The paper's methods in its column order (Table 2) with their display names. A method outside this list
#: (added as ``editors/<name>.py`` + ``editors/hparams/<name>.yaml``) takes its display name and place from its
#: editor class.
METHOD_NAMES: dict[str, str] = {
    "ft_llm": "FT (LLM)", "ft_audio": "FT (Audio)", "ke": "KE", "mend": "MEND", "unke": "UnKE",
    "i_ike": "I-IKE", "ie_ike": "IE-IKE", "wise": "WISE",
}
METHOD_ORDER: tuple[str, ...] = tuple(METHOD_NAMES)

#: The paper's model families (adapter keys) in its row order (Table 2) with their display names.
FAMILY_NAMES: dict[str, str] = {
    "desta25": "DeSTA2.5-Audio", "qwen2_audio": "Qwen2-Audio", "audio_flamingo3": "Audio Flamingo 3",
}
FAMILY_ORDER: tuple[str, ...] = tuple(FAMILY_NAMES)


def method_display(method: str | None, display_name: str | None = None,
                   display_order: float | None = None) -> tuple[str, float]:
    """``(name, order)`` a report or the board shows a method by: the paper's name and Table 2 place for its eight
    methods; else the recorded ``display_name`` / ``display_order`` (a header's or results' DISPLAY_FIELDS); else
    the id itself, after every known method. Another method never takes one of the eight's names (it is then
    shown by its id) nor a place before them."""
    key = method_key(method)
    if key in METHOD_NAMES:
        return METHOD_NAMES[key], float(METHOD_ORDER.index(key))
    name = method or "?"
    if isinstance(display_name, str) and display_name.strip() and method_key(display_name) not in METHOD_NAMES:
        name = display_name
    order = float("inf")
    if isinstance(display_order, (int, float)) and not isinstance(display_order, bool) and display_order == display_order:
        order = max(float(display_order), float(len(METHOD_ORDER)))
    return name, order


def method_key(name: str | None) -> str:
    """The registry key of a method name as people spell it: ``"FT (LLM)"``, ``"ft-llm"`` -> ``"ft_llm"``;
    unknown names are returned lower-cased with ``-`` and spaces as ``_``."""
    text = (name or "").strip()
    for key, label in METHOD_NAMES.items():
        if text == label:
            return key
    squashed = "".join(ch for ch in text.lower() if ch.isalnum())
    for key in METHOD_NAMES:
        if squashed == key.replace("_", ""):
            return key
    return text.lower().replace("-", "_").replace(" ", "_")
