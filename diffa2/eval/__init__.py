"""Benchmark runners for MMSU, MMAU, MMAR and the synthetic test split, with the official scoring rules.

``python -m diffa2.eval run|score|prompts --help``. Generation (``runner``) is kept apart from scoring
(``scoring``), so ``score`` reruns extraction and scoring on any saved predictions file.

Modules: ``specs`` (benchmark specs, benchmarks/*.yaml), ``loaders`` (formats, validation, predictions files),
``prompts`` (templates by name), ``scoring`` (official / strict / normalized), ``report`` (report.json, .md, .png),
``core`` (the one evaluator: decode and score items in memory), ``runner`` (resumable, sharded runs writing the
result files), ``resume`` (fingerprints and partial logs).
"""

from diffa2.eval.loaders import DataError, Item, Record, read_predictions, read_records, validate
from diffa2.eval.prompts import PROMPTS, get_prompt
from diffa2.eval.report import build_report, format_table, write_report
from diffa2.eval.scoring import (
    ScoreResult,
    extract_letter_answer,
    extract_text_answer,
    mmsu_letter,
    score_records,
    word_set,
    wordset_match,
)
from diffa2.eval.specs import BenchmarkSpec, benchmark_names, load_spec

__all__ = [
    "PROMPTS",
    "BenchmarkSpec",
    "DataError",
    "Item",
    "Record",
    "ScoreResult",
    "benchmark_names",
    "build_report",
    "extract_letter_answer",
    "extract_text_answer",
    "format_table",
    "get_prompt",
    "load_spec",
    "mmsu_letter",
    "read_predictions",
    "read_records",
    "score_records",
    "validate",
    "word_set",
    "wordset_match",
    "write_report",
]
