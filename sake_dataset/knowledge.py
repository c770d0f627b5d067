"""Data files the construction rules read: the question banks (generality paraphrases, pool-clip questions) and the
curated portability knowledge (fallback when SAKURA carries no multi-hop questions, and the demo)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

from .labels import ATTRIBUTES, LABELS
from .records import ConstructionError
from .sources.common import read_text

PACKAGE_DIR = Path(__file__).resolve().parent
QUESTION_BANKS_PATH = PACKAGE_DIR / "question_banks.yaml"
PORTABILITY_PATH = PACKAGE_DIR / "portability_knowledge.yaml"

@dataclass(frozen=True)
class QuestionBank:
    """Per attribute: the main question (pool clips), paraphrases (generality types 1/3), option count."""

    question: str
    paraphrases: tuple[str, ...]
    n_options: int


@functools.lru_cache(maxsize=4)
def load_question_banks(path: str = str(QUESTION_BANKS_PATH)) -> dict[str, QuestionBank]:
    """Read `question_banks.yaml` ({attribute: {question, paraphrases, n_options}})."""
    data = yaml.safe_load(read_text(Path(path), "the question banks (YAML)"))
    banks = {}
    for attribute in ATTRIBUTES:
        entry = data.get(attribute) if isinstance(data, dict) else None
        if not isinstance(entry, dict) or not entry.get("question") or not entry.get("paraphrases"):
            raise ConstructionError(f"{path}: field '{attribute}' must hold 'question' and a non-empty "
                                    "'paraphrases' list")
        banks[attribute] = QuestionBank(str(entry["question"]), tuple(str(p) for p in entry["paraphrases"]),
                                        int(entry.get("n_options", min(4, len(LABELS[attribute])))))
    return banks


@dataclass(frozen=True)
class PortabilityCategory:
    questions: tuple[str, ...]
    answers: dict[str, str]
    alternatives: dict[str, tuple[str, ...]]


@functools.lru_cache(maxsize=4)
def load_portability(path: str = str(PORTABILITY_PATH)) -> dict[str, dict[str, PortabilityCategory]]:
    """Read `portability_knowledge.yaml`: {attribute: {categories: {cat: {questions, answers, alternatives}}}}."""
    data = yaml.safe_load(read_text(Path(path), "the portability knowledge (YAML)"))
    out: dict[str, dict[str, PortabilityCategory]] = {}
    for attribute in ATTRIBUTES:
        cats = ((data or {}).get(attribute) or {}).get("categories")
        if not isinstance(cats, dict) or not cats:
            raise ConstructionError(f"{path}: field '{attribute}.categories' missing or empty")
        out[attribute] = {}
        for name, entry in cats.items():
            answers = {str(k): str(v) for k, v in (entry.get("answers") or {}).items()}
            missing = [label for label in LABELS[attribute] if label not in answers]
            if missing or not entry.get("questions"):
                raise ConstructionError(f"{path}: field '{attribute}.categories.{name}' needs 'questions' and "
                                        f"an answer for every label; missing answers: {missing}")
            alts = {str(k): tuple(str(x) for x in v) for k, v in (entry.get("alternatives") or {}).items()}
            out[attribute][str(name)] = PortabilityCategory(tuple(str(q) for q in entry["questions"]), answers,
                                                            alts)
    return out


