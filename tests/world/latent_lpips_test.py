"""The world's LatentLPIPS (`d2g_jax/world/latent_lpips.py`) and the width / custom-latent-space support it needs in
`d2g_jax/losses`: width inference from checkpoint shapes (full and narrow), a micro build whose files our loader
reads (non-negative heads, zero on identical inputs, the name registered with the VAE's scale), and the writer's
full-width output loaded by the official `elatentlpips` package with the same distances as ours. The official
package hard-codes torchvision's VGG16 widths and five encoder names, so a narrow file cannot be loaded there; the
full-width file under an official name is the cross-check of the writer's format."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from torch_oracles import cwd, skip_torch_init

from d2g_jax.losses import elatentlpips as el
from d2g_jax.losses.latent_vgg import (
    VGG16_WIDTHS,
    PerceptualNet,
    conv_indices,
    scaled_widths,
    tap_channels,
    vgg_layers,
    widths_from_tensors,
    widths_from_variables,
)
from d2g_jax.models.tiny import random_params
from d2g_jax.models.vae import AutoencoderKL, VAEConfig, abstract_params
from d2g_jax.models.weights import WeightsError
from d2g_jax.world import latent_lpips as ll
from d2g_jax.world import train_util as tu
from d2g_jax.world.data import world_splits
from d2g_jax.world.vae import WEIGHTS, vae_config_json

REL_TOL = 1e-5  # fp32 compute on identical (fp16-stored) weights, as the loss parity tests
STATIC = ("encoder", "mode", "l1", "normalize")
dist = jax.jit(el.e_latent_lpips, static_argnames=STATIC)  # one compile per option set (eager is slower here)
# torchvision vgg16_bn's classifier, which the official strict load of the trunk file wants.
CLASSIFIER = {"0.weight": (4096, 25088), "0.bias": (4096,), "3.weight": (4096, 4096), "3.bias": (4096,),
              "6.weight": (1000, 4096), "6.bias": (1000,)}  # fmt: skip


def _random_variables(widths, channels: int, seed: int) -> dict:
    """PerceptualNet variables with non-trivial BN statistics and random non-negative heads."""
    module = PerceptualNet(in_channels=channels, latent=True, widths=widths)
    from d2g_jax.losses.latent_vgg import abstract_variables

    rng = np.random.default_rng(seed)
    out = {}
    for path, spec in traverse_util.flatten_dict(abstract_variables(module)).items():
        shape, leaf = tuple(spec.shape), path[-1]
        if leaf == "kernel" and str(path[1]).startswith("lin"):
            v = rng.random(shape)
        elif leaf == "kernel":
            v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif leaf in ("scale", "var"):
            v = 0.5 + rng.random(shape)
        else:
            v = 0.2 * rng.standard_normal(shape)
        out[path] = v.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def _torch_tensors(widths, channels: int) -> dict:
    """`net.features.{i}.weight` shapes of a trunk (zeros; only shapes matter for width inference)."""
    out, cin = {}, channels
    for kind, i, ch in vgg_layers(True, widths):
        if kind == "conv":
            out[f"net.features.{i}.weight"] = np.broadcast_to(np.float32(0), (ch, cin, 3, 3))
            cin = ch
    return out


def test_width_inference_full_and_narrow():
    assert scaled_widths(None) == scaled_widths(1.0) == VGG16_WIDTHS
    assert scaled_widths(0.25) == (16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128)
    assert tap_channels(0.25) == (16, 32, 64, 128, 128) and tap_channels(None) == (64, 128, 256, 512, 512)
    odd = (3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27)
    for widths in (VGG16_WIDTHS, scaled_widths(0.25), odd):
        assert widths_from_tensors(_torch_tensors(widths, 4), source="x") == widths
    assert widths_from_variables(el.random_latent_lpips("sd15", 0, width=odd)) == odd  # full: the official test
    assert widths_from_variables(el.random_latent_lpips("sd3", 0, width=0.125)) == scaled_widths(0.125)
    bad = _torch_tensors(odd, 4)
    bad["net.features.3.weight"] = np.zeros((5, 4, 3, 3), np.float32)  # fed by a 3-wide conv, claims 4 inputs
    with pytest.raises(WeightsError, match=r"x: net.features.3.weight has shape \(5, 4, 3, 3\)"):
        widths_from_tensors(bad, source="x")
    del bad["net.features.3.weight"]
    with pytest.raises(WeightsError, match="missing conv tensor 'net.features.3.weight'"):
        widths_from_tensors(bad, source="x")
    for w in (0, -1.0, (1, 2)):
        with pytest.raises(ValueError):
            scaled_widths(w)


def test_narrow_files_load_with_inferred_widths_and_custom_names(tmp_path):
    widths = scaled_widths(1 / 16)  # the micro build's width and input shapes: the jitted distance compiles once
    v = _random_variables(widths, 4, seed=1)
    ll.save_checkpoints(str(tmp_path), "narrow_t", v, classifier={"digit.weight": np.ones((10, widths[-1]))},
                        latent_space={"name": "narrow_t", "channels": 4, "scale": 0.5, "shift": 0.25},
                        best_acc1=50.0, epoch=1, num_batches_tracked=1)  # fmt: skip
    module, loaded = el.load_latent_lpips(str(tmp_path), "narrow_t")
    assert module.widths == widths and el.ENCODERS["narrow_t"] == el.Encoder(4, 0.5, 0.25)
    # float16 storage: the loaded tensors are the float16-rounded originals.
    ref = jax.tree.map(lambda x: np.asarray(np.asarray(x, np.float16), np.float32), v)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, ref)
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8, 8, 4)), jnp.float32)
    d = dist(loaded, x0, x0 + 1.0, mode="plain", encoder="narrow_t", normalize=True)
    d_manual = dist(loaded, (x0 - 0.25) * 0.5, (x0 + 0.75) * 0.5, mode="plain", encoder="narrow_t")
    np.testing.assert_allclose(np.asarray(d), np.asarray(d_manual), rtol=1e-6)
    # Unknown names without files keep today's error; a lone file names the missing one.
    with pytest.raises(ValueError, match="unknown encoder 'nosuch'; choose one of"):
        el.load_latent_lpips(str(tmp_path), "nosuch")
    with pytest.raises(ValueError, match="unknown encoder 'nosuch'"):
        el.e_latent_lpips(loaded, x0, x0, mode="plain", encoder="nosuch")
    os.remove(os.path.join(tmp_path, "narrow_t_latest_vgg16_tuned.pth"))
    with pytest.raises(WeightsError, match="narrow_t_latest_vgg16_tuned.pth: missing LatentLPIPS checkpoint"):
        el.load_latent_lpips(str(tmp_path), "narrow_t")
    with pytest.raises(ValueError, match="cannot re-register"):
        el.register_encoder("narrow_t", 4, 0.3)
    with pytest.raises(ValueError, match="official latent space"):
        el.register_encoder("sd15", 4, 1.0)


def _subset(split, rows):
    rows = np.asarray(rows)
    return dataclasses.replace(split, images=split.images[rows], gray=split.gray[rows], digits=split.digits[rows],
                               colours=split.colours[rows], mnist_index=split.mnist_index[rows])  # fmt: skip


def test_micro_build_loads_and_is_a_distance(tmp_path):
    cfg = VAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                    scaling_factor=0.8)  # fmt: skip
    vae_dir = str(tmp_path / "vae")
    os.makedirs(vae_dir)
    tu.write_model_folder(vae_dir, vae_config_json(cfg), random_params(abstract_params(AutoencoderKL(cfg)), 0), WEIGHTS)
    splits = world_splits(0)
    small = {"train": _subset(splits["train"], np.arange(0, 4500, 45)),
             "heldout": _subset(splits["heldout"], np.arange(0, 500, 25))}  # fmt: skip
    out = str(tmp_path / "ll")
    m = ll.train_latent_lpips(out, small, vae_dir, seed=0, width=1 / 16, steps_trunk=2, steps_heads=3, name="micro_w",
                              batch_size=16, pool_copies=1, n_2afc=40, log=lambda s: None,
                              distortions=[d for d in ll.DISTORTIONS if d != "vae"])  # fmt: skip
    assert sorted(os.listdir(out)) == ["micro_w_latent_vgg16.pth.tar", "micro_w_latest_vgg16_tuned.pth",
                                       "micro_w_metrics.json"]  # fmt: skip
    h = m["2afc"]["heldout"]
    assert h["n"] == 40 and all(0.0 <= h[k] <= 1.0 for k in ("calibrated", "unit_heads", "latent_mse"))
    assert m["bytes"] == sum(os.path.getsize(os.path.join(out, f)) for f in m["files"])
    # The files in the official layout, as the writer promises.
    tuned = torch.load(os.path.join(out, "micro_w_latest_vgg16_tuned.pth"), weights_only=True)
    trunk = torch.load(os.path.join(out, "micro_w_latent_vgg16.pth.tar"), weights_only=True)
    assert {k.split(".")[0] for k in tuned} == {"net", "lin0", "lin1", "lin2", "lin3", "lin4", "lins"}
    assert {k.split(".")[1] for k in trunk["state_dict"]} == {"features", "classifier"}
    assert trunk[el.LATENT_SPACE_KEY]["scale"] == pytest.approx(0.8) and trunk["best_acc1"] >= 0
    assert tuned["lins.3.model.1.weight"].data_ptr() == tuned["lin3.model.1.weight"].data_ptr()

    module, v = el.load_latent_lpips(out, "micro_w")
    assert module.widths == scaled_widths(1 / 16) and el.ENCODERS["micro_w"].scale == pytest.approx(0.8)
    heads = np.concatenate([np.asarray(v["params"][f"lin{k}"]["model_1"]["kernel"]).ravel() for k in range(5)])
    assert heads.min() >= 0 and heads.max() > 0
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.standard_normal((3, 8, 8, 4)), jnp.float32)
    x1 = x0 + jnp.asarray(0.5 * rng.standard_normal(x0.shape), jnp.float32)
    same = dist(v, x0, x0, encoder="micro_w", mode="plain", l1=False)  # (augmented modes: tests/losses)
    diff = dist(v, x0, x1, encoder="micro_w", mode="plain", l1=False)
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)
    assert np.all(np.asarray(diff) > 0)
    # The calibration's linear form (pair features · heads) is the loss's distance (the build's compiled features).
    feats_fn = ll.pair_features(PerceptualNet(in_channels=4, latent=True, widths=module.widths))
    feats = feats_fn(v, np.asarray(x0), np.asarray(x1))
    np.testing.assert_allclose(feats @ heads, np.asarray(diff), rtol=1e-5)


def test_full_width_writer_output_loads_in_official_package(tmp_path):
    import elatentlpips

    v = _random_variables(VGG16_WIDTHS, 4, seed=2)
    ckpt = str(tmp_path / "ckpt")
    placeholder = {k: np.broadcast_to(np.float32(0), s) for k, s in CLASSIFIER.items()}
    ll.save_checkpoints(ckpt, "sd15", v, classifier=placeholder, latent_space=None, best_acc1=12.5, epoch=3,
                        num_batches_tracked=3)  # fmt: skip
    assert sum(os.path.getsize(p) for p in el.checkpoint_files(ckpt, "sd15")) < 64e6  # float16, stride-0 classifier
    with cwd(tmp_path), skip_torch_init():
        model = elatentlpips.ELatentLPIPS(pretrained=True, encoder="sd15", augment=None, verbose=False).eval()
    module, ours = el.load_latent_lpips(ckpt, "sd15")
    assert module.widths == VGG16_WIDTHS and tuple(conv_indices(True))[:2] == (0, 3)
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)
    x1 = (x0 + 0.7 * rng.standard_normal(x0.shape)).astype(np.float32)
    with torch.no_grad():
        nchw = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # noqa: E731
        ref = model(nchw(x0), nchw(x1), ensembling=False, add_l1_loss=True).numpy().reshape(-1)
    got = dist(ours, jnp.asarray(x0), jnp.asarray(x1), mode="plain", l1=True)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=REL_TOL, atol=0)
