"""VGG16 perceptual networks of LPIPS and LatentLPIPS (paper §3.2 "Learning LatentLPIPS", Appendix B.2).

One code path serves two trunks, both taken from torchvision's `vgg16[_bn].features` and tapped at five places:

* **latent trunk** (LatentLPIPS, the official `elatentlpips.vgg16.CalibratedLatentVGG16BN`): VGG16-BN with a
  `C`-channel first conv (4 for SD1.5/SD2.1/SDXL latents, 16 for SD3/FLUX) and the first three max-pools
  (feature indices 6, 13, 23) replaced by identities because latents are already 8× downsampled. Its slices
  end *after* a module that is a pool in torchvision, so the taps follow feature indices 6, 13, 23 (identity
  pools: full resolution) and 33, 43 (real pools: 1/2 and 1/4 resolution);
* **pixel trunk** (classic LPIPS-VGG, `lpips.pretrained_networks.vgg16`): 3-channel VGG16 without BN, inputs
  shifted/scaled by LPIPS' `ScalingLayer`, taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (feature
  indices 3, 8, 15, 22, 29).

On top of the taps: channel-wise unit normalisation, squared difference, a learned 1×1 conv head per tap
(`lin{k}.model.1`, no bias), spatial mean. `PerceptualNet` returns the five per-layer distances; the loss
functions in `elatentlpips.py` sum them.

Layout: NHWC throughout (`x: [B, H, W, C]`); the PyTorch originals are NCHW. Attribute names mirror the
PyTorch state-dict names (`net.features.{i}`, `lin{k}.model.1`) so `convert.torch_to_flax` is the whole
conversion. BatchNorm runs in inference mode from `batch_stats` (running mean/var), eps 1e-5 as in torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from d2g_jax.models.convert import torch_to_flax
from d2g_jax.models.weights import WeightsError

# torchvision's VGG16 ("D") configuration: conv widths, "M" = 2×2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"
)  # fmt: skip
TAP_CHANNELS = (64, 128, 256, 512, 512)

# LPIPS' ScalingLayer constants (pixel trunk input normalisation; inputs in [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# Checkpoint names we never load: BN step counters and the ImageNet classifier that trained the trunk.
IGNORED_TENSORS = (r"num_batches_tracked$", r"^classifier\.")


def vgg_layers(batch_norm: bool) -> list[tuple[str, int, int]]:
    """torchvision's `make_layers`: `[(kind, feature_index, channels)]`, kind ∈ {conv, bn, relu, pool}."""
    layers, i = [], 0
    for v in VGG16_CFG:
        if v == "M":
            layers.append(("pool", i, 0))
            i += 1
            continue
        layers.append(("conv", i, int(v)))
        i += 1
        if batch_norm:
            layers.append(("bn", i, int(v)))
            i += 1
        layers.append(("relu", i, int(v)))
        i += 1
    return layers


class VGGTrunk(nn.Module):
    """VGG16 features with taps; submodules are named `features_{i}` after torchvision's feature index.

    Attributes:
      batch_norm: VGG16-BN (latent trunk) or plain VGG16 (pixel trunk).
      removed_pools: feature indices of max-pools replaced by identities.
      taps: feature indices after which an output is taken (processing stops after the last one).
      dtype: compute dtype of the convolutions (params stay float32).
    """

    batch_norm: bool
    removed_pools: tuple[int, ...]
    taps: tuple[int, ...]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """x: [B, H, W, C_in] → taps `[B, H_k, W_k, C_k]` with C_k = 64, 128, 256, 512, 512."""
        outs = []
        for kind, i, ch in vgg_layers(self.batch_norm):
            if i > self.taps[-1]:
                break
            if kind == "conv":
                x = nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"features_{i}")(x)
            elif kind == "bn":
                x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=self.dtype, name=f"features_{i}")(x)
            elif kind == "relu":
                x = nn.relu(x)
            elif i not in self.removed_pools:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            if i in self.taps:
                outs.append(x)
        return outs


class NetLinLayer(nn.Module):
    """LPIPS' calibrated head: `Sequential(Dropout, Conv2d(C, 1, 1, bias=False))`; dropout is off at eval."""

    @nn.compact
    def __call__(self, d: jax.Array) -> jax.Array:
        """d: [B, H, W, C] → [B, H, W, 1]."""
        return nn.Conv(1, (1, 1), use_bias=False, name="model_1")(d)


class PerceptualNet(nn.Module):
    """Trunk + unit-normalised squared feature differences + linear heads; per-layer distances.

    Attributes:
      in_channels: input channels (4/16 latent, 3 pixel); only used to document/validate inputs.
      latent: True = latent VGG16-BN trunk (elatentlpips), False = pixel VGG16 trunk (lpips).
      dtype: compute dtype of the trunk.
    """

    in_channels: int
    latent: bool = True
    dtype: Any = jnp.float32

    def setup(self) -> None:
        if self.latent:
            self.net = VGGTrunk(True, (6, 13, 23), (6, 13, 23, 33, 43), dtype=self.dtype)
        else:
            self.net = VGGTrunk(False, (), (3, 8, 15, 22, 29), dtype=self.dtype)
        self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (NetLinLayer() for _ in range(5))

    def features(self, x: jax.Array) -> list[jax.Array]:
        """x: [B, H, W, C] → the five unit-normalised taps (float32)."""
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"expected inputs with {self.in_channels} channels (NHWC), got shape {x.shape}")
        if not self.latent:
            x = (x - jnp.asarray(LPIPS_SHIFT, x.dtype)) / jnp.asarray(LPIPS_SCALE, x.dtype)
        return [self._unit(f.astype(jnp.float32)) for f in self.net(x.astype(self.dtype))]

    def _unit(self, f: jax.Array) -> jax.Array:
        # The two originals differ in where eps goes: elatentlpips sqrt(Σf² + 1e-8), lpips sqrt(Σf²) + 1e-10.
        if self.latent:
            return f / jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True) + 1e-8)
        return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)

    def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
        """x0, x1: [B, H, W, C] → per-layer distances [B, 5] (sum over the last axis is the (Latent)LPIPS)."""
        if x0.shape != x1.shape:
            raise ValueError(f"inputs differ in shape: {x0.shape} vs {x1.shape}")
        # Two trunk passes, not one over the concatenation: when only x0 is differentiated (the generator's
        # output vs a fixed target) the backward pass then runs through x0's half alone.
        f0, f1 = self.features(x0), self.features(x1)
        lins = (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)
        per_layer = [jnp.mean(lin((a - b) ** 2), axis=(1, 2, 3)) for lin, a, b in zip(lins, f0, f1)]
        return jnp.stack(per_layer, axis=-1)


def abstract_variables(module: PerceptualNet, spatial: int = 16) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` as `jax.ShapeDtypeStruct`s (nothing is initialised)."""
    x = jax.ShapeDtypeStruct((1, spatial, spatial, module.in_channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), x, x)


def variables_from_torch(
    module: PerceptualNet, tensors: Mapping[str, np.ndarray], *, source: str, ignore: Sequence[str] = ()
) -> dict[str, Any]:
    """Fills the module's variables from `{torch_name: array}` named `net.features.{i}.*` / `lin{k}.model.1.*`.

    BN running statistics go to `batch_stats`; checkpoint extras in `IGNORED_TENSORS` (+ `ignore`) are skipped.
    """
    abstract = abstract_variables(module)
    renames = ((r"^(params|batch_stats)\.", ""),)  # the collection name is not part of the PyTorch name
    out = torch_to_flax(abstract, tensors, renames=renames, source=source, ignore=(*IGNORED_TENSORS, *ignore))
    return jax.tree.map(jnp.asarray, out)


def torchvision_to_trunk_names(tensors: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """torchvision `vgg16` state dict (`features.{i}.*`, `classifier.*`) → `net.features.{i}.*`."""
    out = {}
    for k, v in tensors.items():
        if k.startswith("features."):
            out["net." + k] = v
        elif not k.startswith("classifier."):
            raise WeightsError(f"{source}: unexpected tensor {k!r}; expected a torchvision vgg16 state dict.")
    return out


def load_pixel_lpips(vgg16_path: str, lin_path: str, *, dtype: Any = jnp.float32) -> tuple[PerceptualNet, dict]:
    """Classic LPIPS-VGG from local files: torchvision `vgg16-397923af.pth` + LPIPS `weights/v0.1/vgg.pth`.

    Args:
      vgg16_path: torchvision VGG16 ImageNet state dict (https://download.pytorch.org/models/vgg16-397923af.pth).
      lin_path: LPIPS linear heads (`lpips` package, `lpips/weights/v0.1/vgg.pth`, keys `lin{k}.model.1.weight`).
      dtype: trunk compute dtype.

    Returns:
      `(module, variables)`; `module.apply(variables, x0, x1)` gives per-layer distances [B, 5] for images in
      [-1, 1], NHWC.
    """
    from d2g_jax.models import torch_pickle

    tensors = torchvision_to_trunk_names(torch_pickle.read_state_dict(vgg16_path), vgg16_path)
    heads = torch_pickle.read_state_dict(lin_path)
    bad = [k for k in heads if not k.startswith("lin")]
    if bad:
        raise WeightsError(f"{lin_path}: expected only LPIPS heads lin{{k}}.model.1.weight, found {bad[:5]}.")
    module = PerceptualNet(in_channels=3, latent=False, dtype=dtype)
    return module, variables_from_torch(module, {**tensors, **heads}, source=f"{vgg16_path} + {lin_path}")
