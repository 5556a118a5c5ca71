"""Prompt lists for pair generation (paper §4 "Training details": LAION-aesthetic captions for SD-CFG-3/8 and
SDXL-CFG-7; COCO captions for evaluation).

`read_prompts(source, ...)` reads, by the file's extension or a `tfds:` prefix:
* `.txt`: one prompt per line (surrounding whitespace stripped, blank lines skipped);
* `.jsonl` / `.json` (one JSON object per line): the `field` of each line, default the first of
  `text`, `caption`, `prompt` present in the line;
* `.parquet`: the `field` column, default the first of those names among the columns (needs pyarrow);
* `tfds:NAME[/CONFIG][:VERSION]`: TensorFlow Datasets, `split` and `field` (a `/`-separated path into nested
  features, e.g. `captions/text`; a list feature yields its first entry). tensorflow_datasets is imported
  lazily, only for this case.

Errors (`PromptsError`) name the file and, where it applies, the line and field. The order is the file's
order: pair `i` uses prompt `i`, so the list must be reproducible.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

DEFAULT_FIELDS = ("text", "caption", "prompt")


class PromptsError(ValueError):
    """A prompt source is missing, malformed or lacks the requested field."""


def read_prompts(
    source: str,
    *,
    field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    data_dir: str | None = None,
) -> list[str]:
    """Reads prompts from a text/JSONL/parquet file or a `tfds:` dataset (see the module docstring).

    Args:
      source: file path, or `tfds:NAME[/CONFIG][:VERSION]`.
      field: JSONL key / parquet column / TFDS feature path (default: first of text, caption, prompt).
      split: TFDS split (e.g. `train`, `validation[:5000]`).
      limit: keep at most this many prompts (in source order).
      data_dir: TFDS data directory.

    Returns:
      The prompts, in source order.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be ≥ 0, got {limit}.")
    if source.startswith("tfds:"):
        prompts = _read_tfds(source[len("tfds:") :], field, split, limit, data_dir)
    else:
        if not os.path.isfile(source):
            raise PromptsError(f"{source}: prompt file not found.")
        ext = os.path.splitext(source)[1].lower()
        readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".json": _read_jsonl, ".parquet": _read_parquet}
        if ext not in readers:
            raise PromptsError(f"{source}: unknown prompt file type {ext!r} (use .txt, .jsonl, .parquet or tfds:).")
        if ext == ".txt" and field is not None:
            raise PromptsError(f"{source}: `field` ({field!r}) does not apply to a .txt file (one prompt per line).")
        prompts = readers[ext](source, field, limit)
    if not prompts:
        raise PromptsError(f"{source}: no prompts found.")
    return prompts


def _take(it: Iterable[str], limit: int | None) -> list[str]:
    """The first `limit` items (all if None), pulling no further item (lines past the limit are not parsed)."""
    return list(it if limit is None else itertools.islice(it, limit))


def _read_txt(path: str, field: str | None, limit: int | None) -> list[str]:
    def lines():
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.strip()

    try:
        return _take(lines(), limit)
    except UnicodeDecodeError as e:
        raise PromptsError(f"{path}: not UTF-8 text ({e}).") from e


def _pick_field(keys: Sequence[str], field: str | None, where: str) -> str:
    if field is not None:
        if field not in keys:
            raise PromptsError(f"{where}: no field {field!r} (has {sorted(keys)}).")
        return field
    for f in DEFAULT_FIELDS:
        if f in keys:
            return f
    raise PromptsError(f"{where}: none of the prompt fields {DEFAULT_FIELDS} present (has {sorted(keys)}); "
                       "pass `field=`.")  # fmt: skip


def _as_prompt(value: Any, where: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if not isinstance(value, str):
        raise PromptsError(f"{where}: prompt is a {type(value).__name__}, not a string ({value!r:.80}).")
    return value


def _read_jsonl(path: str, field: str | None, limit: int | None) -> list[str]:
    def rows():
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptsError(f"{where}: invalid JSON ({e.msg}).") from e
                if not isinstance(obj, dict):
                    raise PromptsError(f"{where}: expected a JSON object per line, got {type(obj).__name__}.")
                yield _as_prompt(obj[_pick_field(list(obj), field, where)], f"{where} field")

    return _take(rows(), limit)


def _read_parquet(path: str, field: str | None, limit: int | None) -> list[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses for non-parquet files
        raise PromptsError(f"{path}: cannot read as parquet ({e}).") from e
    column = _pick_field(pf.schema_arrow.names, field, f"{path} (parquet columns)")
    out: list[str] = []
    for batch in pf.iter_batches(columns=[column]):
        for v in batch.column(0).to_pylist():
            if limit is not None and len(out) >= limit:
                return out
            out.append(_as_prompt(v, f"{path}: column {column!r} row {len(out)}"))
    return out


def _read_tfds(name: str, field: str | None, split: str, limit: int | None, data_dir: str | None) -> list[str]:
    import tensorflow_datasets as tfds  # heavy (imports TensorFlow): only for this source type

    source = f"tfds:{name} split {split!r}"
    try:
        ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
    except Exception as e:  # tfds raises DatasetNotFoundError/AssertionError/... with their own messages
        raise PromptsError(f"{source}: cannot load ({type(e).__name__}: {e}).") from e
    path = (field or "").split("/") if field else None
    out: list[str] = []
    for n, ex in enumerate(tfds.as_numpy(ds)):
        if limit is not None and len(out) >= limit:
            break
        where = f"{source} example {n}"
        value: Any = ex
        keys = path or [_pick_field(list(ex), None, where)]
        for k in keys:
            if not isinstance(value, dict) or k not in value:
                have = sorted(value) if isinstance(value, dict) else type(value).__name__
                raise PromptsError(f"{where}: no feature {field or k!r} (at {k!r}; has {have}).")
            value = value[k]
        if hasattr(value, "ndim") and value.ndim > 0:  # e.g. several captions per image: take the first
            if len(value) == 0:
                raise PromptsError(f"{where}: feature {field!r} is empty.")
            value = value[0]
        out.append(_as_prompt(value.item() if hasattr(value, "item") else value, where))
    return out
