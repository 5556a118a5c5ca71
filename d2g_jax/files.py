"""Small file writers every layer shares (a leaf module: it imports nothing from d2g_jax).

* `atomic_write_json` / `atomic_write_text`: written to `<path>.tmp` and renamed, so a reader (another host, a
  resumed run) sees the old file or the whole new one, never a partial one. Completion markers (`export.json`,
  `run.json`, manifests) are written this way, after what they mark.
* `to_uint8`: decoder output in [-1, 1] → uint8 as diffusers' PIL post-processing.
* `image_grid`: the one grid layout (sample grids during training, the sample mode, reports).
* `write_png`: atomic PNG.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np


def atomic_write_text(path: str, text: str) -> str:
    """`text` at `path` via a temporary file unique to this process + fsync + rename."""
    tmp = f"{path}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str, obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> str:
    """`obj` as JSON at `path`, atomically (numpy scalars are written as Python numbers)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_plain) + "\n")


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return float(x)


def to_uint8(images: Any) -> np.ndarray:
    """Images in [-1, 1] (any float array) → uint8: round(clip(x / 2 + 0.5, 0, 1) · 255), as diffusers' PIL
    post-processing."""
    x = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.round(x * 255.0).astype(np.uint8)


def image_grid(groups: Sequence[np.ndarray], columns: int) -> np.ndarray:
    """One uint8 grid from image groups of equal size (each uint8 [N, H, W, 3]: e.g. teacher, student).

    Each group wraps at `columns`; the groups are interleaved chunk by chunk (group 0's first row, group 1's first
    row, …, group 0's second row, …), so images of one index sit above each other. Missing cells are black.
    """
    if not groups:
        raise ValueError("image_grid: no images.")
    n, h, w = groups[0].shape[:3]
    if any(g.shape != groups[0].shape for g in groups):
        raise ValueError(f"image_grid: groups differ in shape: {[g.shape for g in groups]}.")
    columns = max(1, min(int(columns), n))
    chunks = []
    for start in range(0, n, columns):
        for g in groups:
            part = np.asarray(g[start : start + columns], np.uint8)
            if part.shape[0] < columns:
                part = np.concatenate([part, np.zeros((columns - part.shape[0], h, w, 3), np.uint8)])
            chunks.append(np.concatenate(list(part), axis=1))
    return np.concatenate(chunks, axis=0)


def write_png(path: str, image: np.ndarray) -> str:
    """uint8 [H, W, 3] → PNG at `path` (written under a temporary name and renamed)."""
    from PIL import Image

    tmp = path + ".tmp.png"
    Image.fromarray(np.asarray(image, np.uint8)).save(tmp)
    os.replace(tmp, path)
    return path
