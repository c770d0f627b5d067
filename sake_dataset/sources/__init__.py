"""Source readers: each turns one source layout into normalized records (`sake_dataset.records`)."""

from .dynamic_superb import read_dynamic_superb
from .mmlu import read_mmlu
from .sakura import read_sakura

__all__ = ["read_sakura", "read_dynamic_superb", "read_mmlu"]
