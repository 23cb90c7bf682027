"""Read, validate and write benchmark files in their official formats.

Formats (field lists from docs/benchmarks.md §1.1, §2.1, §3.1 and docs/model.md §7):

* ``mmau_json`` -- MMAU (and the synthetic ``synth`` split): a JSON list of records with ``id``, ``audio_id``
  (path relative to the audio root, e.g. ``./test-mini-audios/<id>.wav``), ``question``, ``choices`` (list),
  ``answer`` (one of the choices), ``task``, ``difficulty``, ``sub-category``, ``category`` (a string, or in
  13 MMAU records a one-element list). Predictions: the same list plus ``model_output`` (+ ``model_prediction``).
* ``mmar_jsonl`` -- MMAR: JSONL (or a JSON list) with ``id``, ``audio_path``, ``question``, ``choices``,
  ``answer``, ``modality``, ``category``, ``sub-category`` and more. Predictions: plus ``answer_prediction``.
* ``mmsu`` -- MMSU: the HF dataset ``ddwang2000/MMSU`` (split ``train``), a parquet file/folder, or JSONL with
  ``id``, ``question``, ``choice_a``..``choice_d`` (``choice_c``/``choice_d`` may be null), ``answer_gt`` (the
  answer *text*), ``category``, ``sub-category``, ``sub-sub-category`` and the audio as ``audio_path`` or
  ``audio`` (a path, or HF's ``{"bytes", "path"}``). Predictions: JSONL plus ``response``.

Every problem found is reported at once, each naming the file, the line (JSONL) or index (JSON list / table)
and the field. Records are kept unchanged (``Record.data``) so predictions carry every metadata field.
"""

from diffa2.eval.loaders.fields import (
    FORMAT_MARKS,
    answer_of,
    breakdown_value,
    choices_of,
    guess_format,
    record_problems,
    validate,
)
from diffa2.eval.loaders.items import to_items
from diffa2.eval.loaders.predictions import (
    jsonable_record,
    read_predictions,
    write_predictions,
)
from diffa2.eval.loaders.records import (
    MAX_PROBLEMS_SHOWN,
    MISSING_VALUE,
    MMSU_CHOICE_KEYS,
    AudioRef,
    DataError,
    Item,
    Record,
)
from diffa2.eval.loaders.sources import (
    read_records,
    read_records_with_identity,
)

__all__ = [
    "FORMAT_MARKS",
    "MAX_PROBLEMS_SHOWN",
    "MISSING_VALUE",
    "MMSU_CHOICE_KEYS",
    "AudioRef",
    "DataError",
    "Item",
    "Record",
    "answer_of",
    "breakdown_value",
    "choices_of",
    "guess_format",
    "jsonable_record",
    "read_predictions",
    "read_records",
    "read_records_with_identity",
    "record_problems",
    "to_items",
    "validate",
    "write_predictions",
]
