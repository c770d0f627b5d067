"""The dataset core under its earlier single-module name: the main names of `labels`, `schema`, `knowledge`,
`dsuperb_tasks`, `portability`, `partition` and `construction` in one import (those modules hold the rest)."""

from .construction import (InstanceBuilder, build_attribute_split, build_sequential, check_instance, clip_question,
                           edit_options, make_edit_pairs, sample_sequences)
from .dsuperb_tasks import TASK_ATTRIBUTE_KEYWORDS, TaskTable, keyword_attributes, load_task_table, task_attributes
from .knowledge import (PORTABILITY_PATH, QUESTION_BANKS_PATH, PortabilityCategory, QuestionBank, load_portability,
                        load_question_banks)
from .labels import (ATTRIBUTES, LABEL_ALIASES, LABELS, attribute_of_label, canonical_label, format_question,
                     option_for_label, split_options)
from .partition import SplitPool, clip_keys, clip_quota, partition_by_hash, partition_clips
from .portability import MultiHopQuestion, PortabilityBank, multi_hop_questions
from .records import ConstructionError
from .schema import (COLUMN_OF_KIND, CONFIGS, DIMENSION_OF_KIND, ITEM_KINDS, PAPER_TOTALS, SAMPLING_RATE, SPLITS,
                     count_totals, expected_kinds, expected_totals, features, item_kinds, item_rows)

__all__ = ["ATTRIBUTES", "COLUMN_OF_KIND", "CONFIGS", "ConstructionError", "DIMENSION_OF_KIND", "ITEM_KINDS",
           "InstanceBuilder", "LABELS", "LABEL_ALIASES", "MultiHopQuestion", "PAPER_TOTALS", "PORTABILITY_PATH",
           "PortabilityBank", "PortabilityCategory", "QUESTION_BANKS_PATH", "QuestionBank", "SAMPLING_RATE", "SPLITS",
           "SplitPool", "TASK_ATTRIBUTE_KEYWORDS", "TaskTable", "attribute_of_label", "build_attribute_split",
           "build_sequential", "canonical_label", "check_instance", "clip_keys", "clip_question", "clip_quota",
           "count_totals", "edit_options", "expected_kinds", "expected_totals", "features", "format_question",
           "item_kinds", "item_rows", "keyword_attributes", "load_portability", "load_question_banks",
           "load_task_table", "make_edit_pairs", "multi_hop_questions", "option_for_label", "partition_by_hash",
           "partition_clips", "sample_sequences", "split_options", "task_attributes"]
