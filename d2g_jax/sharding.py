"""Device mesh, logical-axis rules and shardings (maxdiffusion / lm1b style), all in one place.

One mesh with axes `("data", "fsdp")`: the batch is split over both (every device sees different examples),
parameters and optimiser state are split over `fsdp` (FSDP / ZeRO-3: XLA all-gathers a layer's weights where
they are used). Parameters carry logical axis names from `nn.with_logical_partitioning` (see
`d2g_jax/models/blocks.py`); `PARAM_RULES` says which of them may be split over `fsdp`. Of those, a parameter is
split on its *largest* dimension that the `fsdp` size divides (conv kernels: output channels; dense kernels:
the larger side); parameters with no such dimension (norm scales, small biases) are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")

# Logical parameter axes that may be split over the `fsdp` mesh axis (the largest divisible one is chosen).
PARAM_RULES: dict[str, str | None] = {
    "conv_out": "fsdp",  # conv kernel output channels
    "conv_in": "fsdp",  # conv kernel input channels
    "dense_in": "fsdp",
    "dense_out": "fsdp",
    "vocab": "fsdp",  # CLIP token embedding rows
    "embed": "fsdp",
    "conv_h": None,  # spatial taps are tiny (3): never split
    "conv_w": None,
    "norm": None,  # norm scales/biases: small, replicated
    "positions": None,
}

# Activation rules for `nn.with_logical_constraint` inside the models.
ACTIVATION_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),  # examples over every device
    ("height", None),
    ("width", None),
    ("channels", None),
    ("tokens", None),
    ("embed", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `("data", "fsdp")` mesh over `devices` (default: all, across hosts); `-1` takes what is left."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if fsdp == -1 and data == -1:
        raise ValueError("mesh: at most one of mesh.data / mesh.fsdp may be -1.")
    if fsdp == -1:
        fsdp = n // data if data > 0 else n
    if data == -1:
        data = n // fsdp if fsdp > 0 else n
    if data * fsdp != n or data < 1 or fsdp < 1:
        raise ValueError(f"mesh: data={data} × fsdp={fsdp} must equal the {n} devices available (config.mesh).")
    grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES)


def param_spec(names: Sequence[str | None] | None, shape: Sequence[int], fsdp_size: int) -> PartitionSpec:
    """The PartitionSpec of one parameter: FSDP on its largest shardable dimension divisible by `fsdp_size`."""
    if names is None or fsdp_size == 1:
        return PartitionSpec()
    best = None
    for i, (name, dim) in enumerate(zip(names, shape)):
        if name is not None and PARAM_RULES.get(name) == "fsdp" and dim % fsdp_size == 0:
            if best is None or dim > shape[best]:
                best = i
    if best is None:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return PartitionSpec(*spec)


def param_shardings(abstract_boxed: Any, mesh: Mesh) -> Any:
    """NamedShardings for a boxed abstract variable tree (from `jax.eval_shape(module.init, …)`)."""
    fsdp = mesh.shape["fsdp"]

    def one(leaf):
        if isinstance(leaf, nn.Partitioned):
            return NamedSharding(mesh, param_spec(leaf.names, leaf.value.shape, fsdp))
        return NamedSharding(mesh, param_spec(None, leaf.shape, fsdp))

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over every device of the mesh, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(MESH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def put_global(tree: Any, shardings: Any) -> Any:
    """Host arrays (the same full value on every process) → global `jax.Array`s with `shardings`.

    `jax.make_array_from_callback` works for one and many processes alike: each process materialises only the
    shards its devices hold.
    """

    def one(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

    return jax.tree.map(one, tree, shardings)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host arrays → global arrays replicated on every device of `mesh` (frozen weights, small fixed inputs)."""
    rep = replicated(mesh)
    return put_global(tree, jax.tree.map(lambda _: rep, tree))


def round_batch(batch: int, mesh: Mesh) -> int:
    """The smallest multiple of the mesh's device count ≥ `batch` (≥ one example per device): the one rule for
    every generation batch (sample mode, evaluation, periodic evaluation during training)."""
    n = mesh.size
    return max(1, -(-int(batch) // n)) * n
