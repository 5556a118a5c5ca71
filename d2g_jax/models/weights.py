"""Reading and writing the on-disk weight formats the ports load from: diffusers/transformers folders.

A diffusers model folder holds `config.json` plus one of
  * `diffusion_pytorch_model.safetensors` (or `model.safetensors` for transformers),
  * the `.fp16` variant (`diffusion_pytorch_model.fp16.safetensors`),
  * a sharded checkpoint: `*.safetensors.index.json` whose `weight_map` names the shard of every tensor.

Tensors are read with a zero-copy `np.memmap` over the safetensors payload (the format is an 8-byte header
length, a JSON header and raw little-endian data), which keeps SD-sized loads to seconds and supports bf16
through `ml_dtypes` without importing torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v).name: k for k, v in _ST_DTYPES.items()}


class WeightsError(ValueError):
    """A weight file or folder is missing, corrupt or does not match the model it is loaded into."""


class UnsupportedConfigError(WeightsError):
    """A config value a port does not implement (it would change the math if ignored)."""


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Returns `{name: array}` memory-mapped from one `.safetensors` file (read-only views)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > size - 8:
                raise WeightsError(f"{path}: not a safetensors file (header length {n}, file size {size}).")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: cannot read safetensors header ({e}). Re-download or re-export the file.") from e
    header.pop("__metadata__", None)
    base = 8 + n
    out: dict[str, np.ndarray] = {}
    if not header:
        return out
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, info in header.items():
        dt = _ST_DTYPES.get(info.get("dtype"))
        if dt is None:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}.")
        start, end = info["data_offsets"]
        if base + end > size:
            raise WeightsError(f"{path}: tensor {name!r} runs past the end of the file (truncated download?).")
        out[name] = mm[base + start : base + end].view(dt).reshape(info["shape"])
    return out


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes `tensors` as one safetensors file (atomically: temp name, then rename)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for name in sorted(tensors):
        a = np.ascontiguousarray(np.asarray(tensors[name]))
        code = _ST_NAMES.get(a.dtype.name)
        if code is None:
            raise WeightsError(f"cannot write tensor {name!r} of dtype {a.dtype} to safetensors.")
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the payload to 8 bytes
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)


def read_config(folder: str, filename: str = "config.json") -> dict[str, Any]:
    """Reads a model folder's `config.json`, with errors that name the folder."""
    if not os.path.isdir(folder):
        raise WeightsError(
            f"{folder}: not a folder. Pass the model folder of a diffusers pipeline (e.g. <sd>/unet) holding "
            f"{filename} and the safetensors weights."
        )
    path = os.path.join(folder, filename)
    if not os.path.isfile(path):
        raise WeightsError(f"{folder}: no {filename}; this is not a diffusers/transformers model folder.")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: invalid JSON ({e}).") from e


def find_weight_files(folder: str, stem: str = "diffusion_pytorch_model", variant: str | None = None) -> list[str]:
    """Resolves the safetensors files of a model folder: single file, `.{variant}` file, or sharded index.

    With `variant=None` the plain file is preferred, then the fp16 variant, then sharded indexes.
    """
    candidates = []
    variants = [variant] if variant else [None, "fp16"]
    for v in variants:
        infix = f".{v}" if v else ""
        candidates.append(os.path.join(folder, f"{stem}{infix}.safetensors"))
        candidates.append(os.path.join(folder, f"{stem}.safetensors{'.' + v if v else ''}.index.json"))
        candidates.append(os.path.join(folder, f"{stem}{infix}.safetensors.index.json"))
    for c in candidates:
        if not os.path.isfile(c):
            continue
        if not c.endswith(".index.json"):
            return [c]
        try:
            with open(c) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise WeightsError(f"{c}: not a valid safetensors index (needs a 'weight_map'): {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [s for s in files if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise WeightsError(f"{c}: shard files missing from {folder}: {missing}")
        return [os.path.join(folder, s) for s in files]
    bins = [f for f in os.listdir(folder) if f.endswith(".bin")] if os.path.isdir(folder) else []
    hint = f" Found {bins}: convert them to safetensors first." if bins else ""
    raise WeightsError(f"{folder}: no {stem}[.{variant or 'fp16'}].safetensors or sharded index found.{hint}")


def load_folder_tensors(
    folder: str, stem: str = "diffusion_pytorch_model", variant: str | None = None
) -> dict[str, np.ndarray]:
    """All tensors of a model folder as `{torch_name: memmapped array}`."""
    tensors: dict[str, np.ndarray] = {}
    for path in find_weight_files(folder, stem, variant):
        for k, v in read_safetensors(path).items():
            if k in tensors:
                raise WeightsError(f"{path}: tensor {k!r} appears in more than one shard.")
            tensors[k] = v
    return tensors
