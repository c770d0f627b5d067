"""Published figures the bench compares against: paper Table 7 wall-clock per method and model, and the names used in the report."""

from __future__ import annotations

import logging





from sake_core.protocol import FAMILY_NAMES

LOG = logging.getLogger(__name__)


#: Paper Table 7, Qwen2-Audio, single editing: wall-clock of the whole test split on one H100.
PAPER_TABLE7_QWEN_SINGLE: dict[str, str] = {
    "ft_llm": "2h35m",
    "ft_audio": "3h00m",
    "ke": "4h50m",
    "mend": "2h10m",
    "unke": "1h35m",
    "i_ike": "3h00m",
    "ie_ike": "2h00m",
    "wise": "3h00m",
}


#: Paper Table 7, DeSTA2.5-Audio, single editing (same 1,200 edits, one H100).
PAPER_TABLE7_DESTA_SINGLE: dict[str, str] = {
    "ft_llm": "5h50m",
    "ft_audio": "4h20m",
    "ke": "8h40m",
    "mend": "4h00m",
    "unke": "3h00m",
    "i_ike": "6h00m",
    "ie_ike": "3h20m",
    "wise": "6h10m",
}


#: --model choice -> its Table 7 single-editing rows.
PAPER_TABLE7_SINGLE: dict[str, dict[str, str]] = {"qwen2_audio": PAPER_TABLE7_QWEN_SINGLE,
                                                   "desta25": PAPER_TABLE7_DESTA_SINGLE}


#: Single edits those times cover (300 test instances x 4 attributes).
PAPER_EDITS = 1200


def paper_seconds_per_edit(method: str, model: str = "qwen2_audio") -> float | None:
    """Table 7's wall-clock for ``method`` on ``model`` over the 1,200 edits it covers, or None if not listed."""
    text = PAPER_TABLE7_SINGLE[model].get(method)
    if text is None:
        return None
    hours, minutes = text.rstrip("m").split("h")
    return (int(hours) * 3600 + int(minutes) * 60) / PAPER_EDITS


#: The runner's --model name per bench model and scale (family_of() resolves each without network access).
MODEL_NAMES = {"qwen2_audio": {"full": "Qwen/Qwen2-Audio-7B-Instruct", "tiny": "tiny-qwen2-audio"},
               "desta25": {"full": "DeSTA-ntu/DeSTA2.5-Audio-Llama-3.1-8B", "tiny": "tiny-desta25"}}


#: Words for the report.
MODEL_TITLES = {"qwen2_audio": {"full": "Qwen2-Audio-7B-Instruct architecture", "tiny": "tiny Qwen2-Audio"},
                "desta25": {"full": "DeSTA2.5-Audio architecture (Llama-3.1-8B-Instruct + Whisper-large-v3 + "
                                    "2-layer Q-Former, 64 prompts on encoder layers 7/15/23/31)",
                            "tiny": "tiny DeSTA2.5-Audio"}}


PAPER_MODEL_NAMES = FAMILY_NAMES
