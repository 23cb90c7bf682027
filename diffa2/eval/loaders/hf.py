"""Reader of Hugging Face datasets (MMSU by id): rows with audio kept as encoded bytes, and a clear error offline."""

from __future__ import annotations

from diffa2.eval.loaders.records import DataError, Record


def _read_hf(dataset_id: str, split: str, revision: str | None) -> tuple[list[Record], str]:
    """Rows of a Hugging Face dataset, audio kept as encoded bytes (decoded later by diffa2.audio at 16 kHz)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError([f"{dataset_id}: reading a Hugging Face dataset needs the `datasets` package"]) from exc
    try:
        ds = datasets.load_dataset(dataset_id, split=split, revision=revision)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types (offline, missing, auth)
        raise DataError(
            [f"{dataset_id}: cannot load split {split!r} from the Hugging Face Hub or cache ({type(exc).__name__}: "
             f"{exc}); pass a local parquet/JSONL path with --data"]
        ) from exc
    if "audio" in ds.column_names:
        ds = ds.cast_column("audio", datasets.Audio(decode=False))
    identity = f"hf:{dataset_id}@{revision or 'default'} fingerprint {getattr(ds, '_fingerprint', '?')}"
    return [Record(row, f"hf:{dataset_id}[{i}]", i) for i, row in enumerate(ds)], identity
