"""PyTorch state-dict ↔ Flax parameter-tree conversion, one declarative table used in both directions.

Our linen modules name their attributes exactly as the PyTorch modules do, so a Flax path maps to a PyTorch
name mechanically:

  down_blocks_0/resnets_1/conv1/kernel  ↔  down_blocks.0.resnets.1.conv1.weight

* a path segment ending in `_<digits>` is a list element (`setup()` names list entries `name_i`) and becomes
  `name.i`, except where a model's `renames` table says otherwise (e.g. diffusers' `linear_1`);
* the leaf decides the layout: conv `kernel` [kh, kw, in, out] ↔ `weight` [out, in, kh, kw] (transpose
  (2, 3, 1, 0) / (3, 2, 0, 1)); dense `kernel` [in, out] ↔ `weight` [out, in]; norm `scale` ↔ `weight`;
  `embedding` ↔ `weight`; BatchNorm statistics `mean`/`var` ↔ `running_mean`/`running_var`.

Loading walks the *abstract* tree from `jax.eval_shape(model.init, ...)` (nothing is random-initialised), so
the expected set of tensors and their shapes come from the module itself: anything missing, unexpected or
shape-mismatched is reported in one error naming every offender.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from d2g_jax.models.weights import WeightsError

Renames = Sequence[tuple[str, str]]  # (regex on the dotted PyTorch name derived from the Flax path, replacement)

_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "embedding": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


def flax_path_to_torch(path: Sequence[str], renames: Renames = ()) -> str:
    """`('down_blocks_0', 'resnets_1', 'conv1', 'kernel')` → `'down_blocks.0.resnets.1.conv1.weight'`."""
    *mods, leaf = path
    if leaf not in _LEAF:
        raise WeightsError(f"no PyTorch equivalent for Flax leaf {'/'.join(path)!r}")
    parts = [re.sub(r"_(\d+)$", r".\1", m) for m in mods]
    name = ".".join(parts + [_LEAF[leaf]])
    for pattern, repl in renames:
        name = re.sub(pattern, repl, name)
    return name


def to_flax_layout(leaf: str, x: np.ndarray, flax_ndim: int) -> np.ndarray:
    """PyTorch tensor → Flax layout for the leaf kind (`flax_ndim` disambiguates conv/dense kernels)."""
    if leaf == "kernel":
        if x.ndim == 4:
            return x.transpose(2, 3, 1, 0)
        if x.ndim == 2:
            return x.T
        if x.ndim == 3:  # conv1d [out, in, k] -> [k, in, out]
            return x.transpose(2, 1, 0)
    return x


def to_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        if x.ndim == 4:
            return x.transpose(3, 2, 0, 1)
        if x.ndim == 2:
            return x.T
        if x.ndim == 3:
            return x.transpose(2, 1, 0)
    return x


def _fmt(names: Sequence[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" … and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def torch_to_flax(
    abstract: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    *,
    renames: Renames = (),
    source: str = "checkpoint",
    ignore: Sequence[str] = (),
    dtype: Any = None,
    transform: Callable[[str, np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """Fills the abstract Flax tree (leaves with `.shape`/`.dtype`) from a PyTorch state dict.

    Args:
      abstract: the tree of `jax.ShapeDtypeStruct` from `jax.eval_shape` (one collection, e.g. `params`).
      tensors: `{torch_name: array}` (memory-mapped arrays are fine: only what is needed is read).
      renames: model-specific regex fixes of the derived PyTorch names.
      source: what to name in errors (the folder or file).
      ignore: regexes of PyTorch names that are allowed to be left unused (buffers such as `position_ids`).
      dtype: cast every leaf to this dtype; default: the abstract leaf's dtype.
      transform: optional hook `(torch_name, array) -> array` applied after the layout change.

    Returns:
      A nested dict of numpy arrays with exactly the abstract tree's structure, shapes and dtypes.
    """
    flat = traverse_util.flatten_dict(abstract)
    out: dict[tuple[str, ...], np.ndarray] = {}
    missing, mismatched, used = [], [], set()
    for path, spec in flat.items():
        path = tuple(p.key if hasattr(p, "key") else p for p in path)
        name = flax_path_to_torch(path, renames)
        if name not in tensors:
            missing.append(f"{name} (for {'/'.join(path)}, shape {tuple(spec.shape)})")
            continue
        used.add(name)
        x = to_flax_layout(path[-1], np.asarray(tensors[name]), len(spec.shape))
        if transform is not None:
            x = transform(name, x)
        if tuple(x.shape) != tuple(spec.shape):
            mismatched.append(f"{name}: checkpoint {tuple(x.shape)} (Flax layout) vs model {tuple(spec.shape)}")
            continue
        out[path] = x.astype(dtype or spec.dtype, copy=False)
    unexpected = [k for k in tensors if k not in used and not any(re.search(p, k) for p in ignore)]
    if missing or mismatched or unexpected:
        lines = [f"{source}: checkpoint does not match the model built from its config."]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {_fmt(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {_fmt(mismatched)}")
        lines.append("  Check that config.json belongs to these weights (same model family and sizes).")
        raise WeightsError("\n".join(lines))
    return traverse_util.unflatten_dict(out)


def flax_to_torch(params: Mapping[str, Any], *, renames: Renames = (), dtype: Any = None) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flax`: `{torch_name: array}` in PyTorch layout (host numpy arrays)."""
    out = {}
    for path, x in traverse_util.flatten_dict(params).items():
        path = tuple(p.key if hasattr(p, "key") else p for p in path)
        a = np.asarray(jax.device_get(x))
        a = np.ascontiguousarray(to_torch_layout(path[-1], a))
        out[flax_path_to_torch(path, renames)] = a.astype(dtype, copy=False) if dtype is not None else a
    return out
