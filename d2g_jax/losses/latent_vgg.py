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

Widths: by default every conv has torchvision's VGG16 width (64 … 512). `widths` (13 conv output widths, one per
conv in feature order) builds a narrower trunk of the same topology, e.g. `scaled_widths(0.25)` = 16, 16, 32, 32,
64, 64, 64, 128, … for a LatentLPIPS that runs on a CPU; the heads follow the tap widths. Loaders never take the
width as an argument: `widths_from_tensors` reads it from the checkpoint's conv shapes (an official full-width
file gives the full widths, a narrow file in the same format its own), and `widths_from_variables` reads it
from a variables tree, so jitted loss functions rebuild the right module from the variables they are given.

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
VGG16_WIDTHS: tuple[int, ...] = tuple(int(v) for v in VGG16_CFG if v != "M")  # the 13 conv output widths
TAP_CHANNELS = (64, 128, 256, 512, 512)
TAP_CONVS = (1, 3, 6, 9, 12)  # the conv (0-based among the 13) whose block each tap closes: tap k has its width

LATENT_REMOVED_POOLS = (6, 13, 23)  # the first three max-pools, identities in the latent trunk
LATENT_TAPS = (6, 13, 23, 33, 43)
PIXEL_TAPS = (3, 8, 15, 22, 29)

# LPIPS' ScalingLayer constants (pixel trunk input normalisation; inputs in [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)

# Checkpoint names we never load: BN step counters and the ImageNet classifier that trained the trunk.
IGNORED_TENSORS = (r"num_batches_tracked$", r"^classifier\.")


def scaled_widths(width: float | Sequence[int] | None = None) -> tuple[int, ...]:
    """The 13 conv output widths of a VGG16 trunk.

    Args:
      width: None or 1.0 = torchvision's widths; a float multiplier `m` > 0 = `max(1, round(m · c))` per conv
        (0.25 → 16, 16, 32, 32, 64, 64, 64, 128, 128, 128, 128, 128, 128); or 13 explicit positive widths.
    """
    if width is None:
        return VGG16_WIDTHS
    if isinstance(width, (int, float, np.integer, np.floating)) and not isinstance(width, bool):
        m = float(width)
        if not (m > 0 and np.isfinite(m)):
            raise ValueError(f"width multiplier must be a positive number, got {width!r}")
        return tuple(max(1, int(round(m * c))) for c in VGG16_WIDTHS)
    widths = tuple(int(w) for w in width)
    if len(widths) != len(VGG16_WIDTHS) or min(widths) < 1:
        raise ValueError(f"expected {len(VGG16_WIDTHS)} positive conv widths (one per VGG16 conv), got {width!r}")
    return widths


def tap_channels(widths: Sequence[int] | None = None) -> tuple[int, ...]:
    """Channels of the five taps (and heads) of a trunk with these conv widths (default: 64, 128, 256, 512, 512)."""
    w = scaled_widths(widths)
    return tuple(w[i] for i in TAP_CONVS)


def vgg_layers(batch_norm: bool, widths: Sequence[int] | None = None) -> list[tuple[str, int, int]]:
    """torchvision's `make_layers`: `[(kind, feature_index, channels)]`, kind ∈ {conv, bn, relu, pool}.

    `widths`: the 13 conv output widths (default VGG16's, see `scaled_widths`)."""
    widths = iter(scaled_widths(widths))
    layers, i = [], 0
    for v in VGG16_CFG:
        if v == "M":
            layers.append(("pool", i, 0))
            i += 1
            continue
        ch = next(widths)
        layers.append(("conv", i, ch))
        i += 1
        if batch_norm:
            layers.append(("bn", i, ch))
            i += 1
        layers.append(("relu", i, ch))
        i += 1
    return layers


def conv_indices(batch_norm: bool) -> tuple[int, ...]:
    """Feature indices of the 13 convs (`features.{i}`): 0, 2, 5, … plain; 0, 3, 7, … with BN."""
    return tuple(i for kind, i, _ in vgg_layers(batch_norm) if kind == "conv")


def widths_from_tensors(
    tensors: Mapping[str, Any], *, source: str, batch_norm: bool = True, prefix: str = "net.features."
) -> tuple[int, ...]:
    """The 13 conv widths of a checkpoint, read from the shapes of `{prefix}{i}.weight` ([out, in, 3, 3])."""
    widths, cin = [], None
    for i in conv_indices(batch_norm):
        name = f"{prefix}{i}.weight"
        if name not in tensors:
            raise WeightsError(f"{source}: missing conv tensor {name!r}; not a VGG16{'-BN' if batch_norm else ''} "
                               "trunk checkpoint.")  # fmt: skip
        shape = tuple(np.shape(tensors[name]))
        if len(shape) != 4 or shape[2:] != (3, 3) or (cin is not None and shape[1] != cin):
            raise WeightsError(f"{source}: {name} has shape {shape}; expected [out, {cin or 'in'}, 3, 3] "
                               "(a VGG16 conv fed by the previous conv).")  # fmt: skip
        widths.append(shape[0])
        cin = shape[0]
    return tuple(widths)


def widths_from_variables(variables: Mapping[str, Any]) -> tuple[int, ...]:
    """The 13 conv widths of a latent (BN) or pixel trunk's variables (`params/net/features_{i}/kernel`)."""
    net = variables["params"]["net"]
    bn = "features_3" in net and "features_2" not in net  # conv indices 0, 3, … (BN) vs 0, 2, … (plain)
    return tuple(int(net[f"features_{i}"]["kernel"].shape[-1]) for i in conv_indices(bn))


class VGGTrunk(nn.Module):
    """VGG16 features with taps; submodules are named `features_{i}` after torchvision's feature index.

    Attributes:
      batch_norm: VGG16-BN (latent trunk) or plain VGG16 (pixel trunk).
      removed_pools: feature indices of max-pools replaced by identities.
      taps: feature indices after which an output is taken (processing stops after the last one).
      dtype: compute dtype of the convolutions (params stay float32).
      widths: the 13 conv output widths (default VGG16's; `scaled_widths(m)` for a narrower trunk).
    """

    batch_norm: bool
    removed_pools: tuple[int, ...]
    taps: tuple[int, ...]
    dtype: Any = jnp.float32
    widths: tuple[int, ...] = VGG16_WIDTHS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
        """x: [B, H, W, C_in] → taps `[B, H_k, W_k, C_k]` with C_k = `tap_channels(widths)` (64, 128, 256, 512, 512).

        `train=True` (trunk pre-training only) normalises BN with batch statistics and updates `batch_stats`
        (torch's momentum 0.1; call with `mutable=['batch_stats']`); the losses always use running statistics."""
        outs = []
        for kind, i, ch in vgg_layers(self.batch_norm, self.widths):
            if i > self.taps[-1]:
                break
            if kind == "conv":
                x = nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name=f"features_{i}")(x)
            elif kind == "bn":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                                 name=f"features_{i}")(x)  # fmt: skip
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
      widths: the trunk's 13 conv widths (None: VGG16's); loaders infer it from the checkpoint
        (`widths_from_tensors`), loss functions from the variables (`widths_from_variables`).
    """

    in_channels: int
    latent: bool = True
    dtype: Any = jnp.float32
    widths: tuple[int, ...] | None = None

    def setup(self) -> None:
        w = scaled_widths(self.widths)
        if self.latent:
            self.net = VGGTrunk(True, LATENT_REMOVED_POOLS, LATENT_TAPS, dtype=self.dtype, widths=w)
        else:
            self.net = VGGTrunk(False, (), PIXEL_TAPS, dtype=self.dtype, widths=w)
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
    """`{'params', 'batch_stats'}` as `jax.ShapeDtypeStruct`s (nothing is initialised), at the module's `widths`."""
    x = jax.ShapeDtypeStruct((1, spatial, spatial, module.in_channels), jnp.float32)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), x, x)


def variables_from_torch(
    module: PerceptualNet, tensors: Mapping[str, np.ndarray], *, source: str, ignore: Sequence[str] = ()
) -> dict[str, Any]:
    """Fills the module's variables from `{torch_name: array}` named `net.features.{i}.*` / `lin{k}.model.1.*`.

    BN running statistics go to `batch_stats`; checkpoint extras in `IGNORED_TENSORS` (+ `ignore`) are skipped.
    The module's `widths` must be the checkpoint's (`widths_from_tensors`); a mismatch is a shape error.
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
