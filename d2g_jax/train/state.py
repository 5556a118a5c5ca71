"""Train state pytree and its shardings (one place for how every array of a run is laid out on the mesh).

Parameters (and their EMA) are split by the logical-axis rules of `d2g_jax.sharding` (FSDP on the largest
divisible dimension); optimiser state leaves that mirror a parameter (Adam's mu/nu) get that parameter's sharding,
found by matching the parameter's key path as a suffix of the optimiser leaf's key path; scalars (step counts)
are replicated.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import numpy as np
from jax.sharding import Mesh

from d2g_jax.sharding import replicated


@flax.struct.dataclass
class TrainState:
    """Everything a step changes. `rng` is the run's base key (steps fold in `step`), so it never changes.

    `disc`/`disc_opt` hold the discriminator's params/optimiser state in stage 2 (None in stage 1).
    """

    step: jax.Array
    params: Any
    ema: Any
    opt_state: Any
    rng: jax.Array
    disc: Any = None
    disc_opt: Any = None


def _path_key(path) -> tuple:
    out = []
    for p in path:
        if isinstance(p, jax.tree_util.DictKey):
            out.append(str(p.key))
        elif isinstance(p, jax.tree_util.GetAttrKey):
            out.append(p.name)
        elif isinstance(p, jax.tree_util.SequenceKey):
            out.append(p.idx)
        else:
            out.append(str(p))
    return tuple(out)


def mirror_shardings(tree: Any, params: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for `tree` (e.g. an optimiser state): leaves whose key path ends with a parameter's key path
    and that have its shape get that parameter's sharding; everything else is replicated."""
    by_path = {}
    for (path, p), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(params_shardings)):
        by_path[_path_key(path)] = (tuple(np.shape(p)), s)
    depth = {len(k) for k in by_path}

    def one(path, leaf):
        key = _path_key(path)
        for n in depth:
            hit = by_path.get(key[-n:]) if len(key) >= n else None
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(state_abstract: TrainState, params_shardings: Any, mesh: Mesh,
                    disc_shardings: Any = None) -> TrainState:  # fmt: skip
    """A `TrainState` of shardings for a (possibly abstract) state."""
    rep = replicated(mesh)
    return TrainState(
        step=rep,
        params=params_shardings,
        ema=params_shardings,
        opt_state=mirror_shardings(state_abstract.opt_state, state_abstract.params, params_shardings, mesh),
        rng=rep,
        disc=disc_shardings,
        disc_opt=None
        if state_abstract.disc_opt is None
        else mirror_shardings(state_abstract.disc_opt, state_abstract.disc, disc_shardings, mesh),
    )
