"""Mesh construction and FSDP parameter shardings on an 8-device CPU mesh (maxdiffusion unet_test style)."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from d2g_jax import sharding
from d2g_jax.models.tiny import TINY_UNET, random_params
from d2g_jax.models.unet import UNet2DConditionModel, abstract_variables
from d2g_jax.models.unet_config import UNetConfig


def test_make_mesh_shapes_and_errors():
    assert jax.device_count() == 8
    assert dict(sharding.make_mesh(4, 2).shape) == {"data": 4, "fsdp": 2}
    assert dict(sharding.make_mesh(-1, 8).shape) == {"data": 1, "fsdp": 8}
    assert dict(sharding.make_mesh(2, -1).shape) == {"data": 2, "fsdp": 4}
    with pytest.raises(ValueError, match="config.mesh"):
        sharding.make_mesh(3, 2)


def test_sd15_param_specs_fsdp_on_largest_divisible_dim():
    boxed = abstract_variables(UNet2DConditionModel(UNetConfig()))  # SD1.5 shapes, no FLOPs
    sh = sharding.param_shardings(boxed, sharding.make_mesh(1, 8))["params"]
    spec = lambda *path: functools.reduce(lambda d, k: d[k], path, sh).spec
    assert spec("conv_in", "kernel") == P(None, None, None, "fsdp")  # [3, 3, 4, 320]
    assert spec("conv_out", "kernel") == P(None, None, "fsdp", None)  # [3, 3, 320, 4]: 4 does not divide
    assert spec("time_embedding", "linear_1", "kernel") == P(None, "fsdp")  # [320, 1280]
    assert spec("conv_norm_out", "scale") == P()  # norms replicated
    attn = ("down_blocks_0", "attentions_0", "transformer_blocks_0", "attn2")
    assert spec(*attn, "to_k", "kernel") == P("fsdp", None)  # [768, 320]: the larger side
    ff = ("mid_block", "attentions_0", "transformer_blocks_0", "ff", "net_0", "proj", "kernel")
    assert spec(*ff) == P(None, "fsdp")  # [1280, 10240]
    # every parameter of more than 4096 elements is actually split
    shapes = jax.tree_util.tree_leaves_with_path(nn.unbox(boxed)["params"])
    specs = jax.tree.leaves(sh, is_leaf=lambda x: hasattr(x, "spec"))
    assert len(shapes) == len(specs)
    for (path, s), ns in zip(shapes, specs):
        if np.prod(s.shape) > 4096:
            assert "fsdp" in tuple(ns.spec), jax.tree_util.keystr(path)


@pytest.mark.parametrize("data, fsdp", [(4, 2), (1, 8)])
def test_sharded_forward_equals_single_device(data, fsdp):
    module = UNet2DConditionModel(TINY_UNET)
    boxed = abstract_variables(module)
    params = {"params": random_params(nn.unbox(boxed)["params"], 0)}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((8, 5, 32)).astype(np.float32)
    t = np.linspace(1, 999, 8).astype(np.float32)
    ref = np.asarray(jax.jit(module.apply)(params, x, t, ctx))

    mesh = sharding.make_mesh(data, fsdp)
    p_sh = sharding.param_shardings(boxed, mesh)
    sharded = jax.device_put(params, p_sh)
    kernel = sharded["params"]["down_blocks_1"]["resnets_0"]["conv1"]["kernel"]  # [3, 3, 32, 64]
    assert kernel.sharding.spec == P(None, None, None, "fsdp")
    b = lambda a: jax.device_put(a, sharding.batch_sharding(mesh, a.ndim))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.ACTIVATION_RULES):
        out = jax.jit(module.apply)(sharded, b(x), b(t), b(ctx))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)
