"""E-LatentLPIPS, the regression loss of Diffusion2GAN (paper §3.2, Eq. 3–4; Appendix B; Table A1).

    d(x0, x1) = Σ_k mean_hw( lin_k( (f̂_k(T(x0)) − f̂_k(T(x1)))² ) )  [+ mean |x0 − x1|]

with f̂_k the unit-normalised taps of the latent VGG16-BN (`latent_vgg.py`), `T` one random differentiable
augmentation per example shared by both inputs (`augment.py`), and the L1 term between the raw latents taken
*before* augmentation (the official `ELatentLPIPS.forward(add_l1_loss=True)`). Modes:

* `'ensemble'`: E-LatentLPIPS (Eq. 3, one augmentation draw per call);
* `'plain'`: LatentLPIPS, no augmentation;
* `'star'`: E-LatentLPIPS* of Table A1 (SD-CFG-3) = mean of the augmented and the plain distance.

Weights are the official release files (`load_latent_lpips`), read without torch. `pixel_lpips` is the
"LPIPS (pixel)" ablation of Table 1: decode both latents with the SD VAE, then classic LPIPS-VGG.

Inputs are NHWC latents `x: [B, H, W, C]` (C = 4 for sd15/sd21/sdxl, 16 for sd3/flux); the official package
takes NCHW. Outputs are per-example distances `[B]` (the official returns `[B, 1, 1, 1]`).

Latent spaces (`encoder`). A name selects the files `{encoder}_latent_vgg16.pth.tar` /
`{encoder}_latest_vgg16_tuned.pth` and an `Encoder` (channel count, and the scale/shift of `normalize=True`):

* the five official names (`OFFICIAL_ENCODERS`: sd15, sd21, sdxl, sd3, flux) are built in; their files come from the
  official release (a missing file names its download URL);
* any other name (letters, digits, `_`, `-`) is a latent space of one's own, e.g. the MNIST world's
  (`d2g_jax.world.latent_lpips` writes its files in the official format). `load_latent_lpips(dir, name)` accepts
  it when both of its files are in `dir`, takes the channel count from the first conv and the scale/shift from
  the trunk file's `latent_space` entry (an extra top-level key next to `state_dict`, which the official
  package ignores), and registers the name (`register_encoder`) so that `e_latent_lpips(..., encoder=name)` — and
  so `config.loss.encoder=name` with `config.loss.ckpt_dir=dir` — works unchanged afterwards. A file without that
  entry registers no scale: `normalize=True` is then refused (pass latents already in the diffusion space).
  Loading the same name with different channels/scale in one process is an error, not a silent switch.
  `register_encoder(name, channels, scale, shift)` also registers a name by hand (e.g. before random weights).
  An unknown name with no files in `dir` is refused as before ("unknown encoder …").

Width. The trunk's conv widths are read from the checkpoint (`latent_vgg.widths_from_tensors`): the official
full-width files load as VGG16-BN, a narrow file (e.g. the world's width-¼ trunk) as its own width; loss functions
rebuild the module from the variables they are given (`widths_from_variables`), so nothing else changes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.losses import augment
from d2g_jax.losses.latent_vgg import (
    PerceptualNet,
    scaled_widths,
    variables_from_torch,
    widths_from_tensors,
    widths_from_variables,
)
from d2g_jax.models import torch_pickle
from d2g_jax.models.weights import WeightsError


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A latent space: channel count and the official `normalize=True` map `x ↦ (x − shift) · scale`
    (`scale=None`: unknown, `normalize=True` is refused)."""

    channels: int
    scale: float | None
    shift: float = 0.0


ENCODERS: dict[str, Encoder] = {
    "sd15": Encoder(4, 0.18215),
    "sd21": Encoder(4, 0.18215),
    "sdxl": Encoder(4, 0.13025),
    "sd3": Encoder(16, 1.5305, 0.0609),
    "flux": Encoder(16, 0.3611, 0.1159),
}
OFFICIAL_ENCODERS = frozenset(ENCODERS)
RELEASE_URL = "https://huggingface.co/Mingguksky/elatentlpips/resolve/main/elatentlpips_ckpt"
MODES = ("ensemble", "plain", "star")
LATENT_SPACE_KEY = "latent_space"  # trunk-file entry of a custom latent space: {name, channels, scale, shift}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def check_encoder(encoder: str) -> Encoder:
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[encoder]


def _check_name(encoder: str) -> None:
    if not isinstance(encoder, str) or not _NAME.fullmatch(encoder):
        raise ValueError(f"encoder name {encoder!r} must be letters, digits, '_' or '-' (it names checkpoint files)")


def register_encoder(name: str, channels: int, scale: float | None = None, shift: float = 0.0) -> Encoder:
    """Registers a latent space of one's own under `name` (files `{name}_latent_vgg16.pth.tar`, ...).

    Registering a name again with the same values is a no-op; with other values (or an official name with
    values other than the official ones) it is an error.
    """
    _check_name(name)
    enc = Encoder(int(channels), None if scale is None else float(scale), float(shift))
    if enc.channels < 1:
        raise ValueError(f"encoder {name!r}: channels must be positive, got {channels}")
    old = ENCODERS.get(name)
    if old is not None and old != enc:
        what = "an official latent space" if name in OFFICIAL_ENCODERS else "already registered"
        raise ValueError(f"encoder {name!r} is {what} as {old}; cannot re-register it as {enc} (use another name).")
    ENCODERS[name] = enc
    return enc


def checkpoint_files(ckpt_dir: str, encoder: str) -> tuple[str, str]:
    """The two files of a latent space: the classifier-trained latent VGG16-BN trunk and the calibrated (tuned)
    model. Official names, registered names and any other valid name (a custom latent space) are accepted."""
    _check_name(encoder)
    return (
        os.path.join(ckpt_dir, f"{encoder}_latent_vgg16.pth.tar"),
        os.path.join(ckpt_dir, f"{encoder}_latest_vgg16_tuned.pth"),
    )


def _require(path: str, official: bool = True) -> None:
    if not os.path.isfile(path):
        name = os.path.basename(path)
        if official:
            raise WeightsError(
                f"{path}: missing E-LatentLPIPS checkpoint. Download it from {RELEASE_URL}/{name} "
                f"and put it in {os.path.dirname(path) or '.'}/ (the official package keeps both files in ./ckpt/)."
            )
        raise WeightsError(
            f"{path}: missing LatentLPIPS checkpoint of a custom latent space (its other file is in "
            f"{os.path.dirname(path) or '.'}/). Both files come from one training run "
            "(d2g_jax.world.latent_lpips.train_latent_lpips); copy the missing one next to the other."
        )


def _custom_encoder(encoder: str, trunk_obj: Any, first_conv: np.ndarray | None, source: str) -> Encoder:
    """The Encoder of a custom latent space from its files: channels from the first conv, scale/shift from the
    trunk file's `latent_space` entry (if any)."""
    if first_conv is None:
        raise WeightsError(f"{source}: no first conv (net.features.0.weight); cannot tell the latent channels.")
    channels = int(first_conv.shape[1])
    meta = trunk_obj.get(LATENT_SPACE_KEY) if isinstance(trunk_obj, dict) else None
    scale, shift = None, 0.0
    if isinstance(meta, dict):
        if "channels" in meta and int(meta["channels"]) != channels:
            raise WeightsError(f"{source}: {LATENT_SPACE_KEY} says {meta['channels']} channels, the first conv "
                               f"takes {channels}; the two files do not belong together.")  # fmt: skip
        scale = None if meta.get("scale") is None else float(meta["scale"])
        shift = float(meta.get("shift") or 0.0)
    try:
        return register_encoder(encoder, channels, scale, shift)
    except ValueError as e:
        raise WeightsError(f"{source}: {e}") from e


def load_latent_lpips(ckpt_dir: str, encoder: str = "sd15", *, dtype: Any = jnp.float32) -> tuple[PerceptualNet, dict]:
    """Loads LatentLPIPS from the official files in `ckpt_dir` (or a custom latent space's files in that format).

    Files: `{encoder}_latent_vgg16.pth.tar` (trunk: `{'state_dict': {[module.]model.features.{i}.*, ...}}`) and
    `{encoder}_latest_vgg16_tuned.pth` (the calibrated `ELatentLPIPS` state dict: `net.slice{k}.{i}.*` and
    `lin{k}.model.1.weight`). Like the official strict `load_state_dict`, trunk tensors present in the tuned
    file override those of the trunk file. The trunk's widths come from the tensors' shapes (full VGG16-BN for
    the official files). A name other than the official five is a custom latent space (module docstring).

    Returns:
      `(module, variables)` with `module.apply(variables, x0, x1)` → per-layer distances [B, 5], NHWC inputs.
    """
    official = encoder in OFFICIAL_ENCODERS
    if not official and encoder not in ENCODERS:
        _check_name(encoder)
        if not any(os.path.isfile(f) for f in checkpoint_files(ckpt_dir, encoder)):
            raise ValueError(
                f"unknown encoder {encoder!r}; choose one of {sorted(ENCODERS)}, or put the files of a latent "
                f"space of your own, {encoder}_latent_vgg16.pth.tar and {encoder}_latest_vgg16_tuned.pth (e.g. "
                f"from d2g_jax.world.latent_lpips), in {ckpt_dir or '.'}/"
            )
    trunk_path, tuned_path = checkpoint_files(ckpt_dir, encoder)
    _require(trunk_path, official)
    _require(tuned_path, official)
    tensors: dict[str, np.ndarray] = {}
    origin = trunk_path  # the file the first conv finally comes from (for the channel-count error)
    trunk_obj = torch_pickle.load(trunk_path)
    if not isinstance(trunk_obj, dict) or "state_dict" not in trunk_obj:
        found = sorted(trunk_obj)[:10] if isinstance(trunk_obj, dict) else type(trunk_obj).__name__
        raise WeightsError(f"{trunk_path}: no 'state_dict' entry in the checkpoint (found {found}).")
    for k, v in torch_pickle.flatten_arrays(trunk_obj["state_dict"]).items():
        k = k[len("module.") :] if k.startswith("module.") else k
        if k.startswith("model.features."):
            tensors["net." + k[len("model.") :]] = v
        elif not k.startswith("model.classifier."):
            raise WeightsError(f"{trunk_path}: unexpected tensor {k!r} in a latent VGG16-BN trunk checkpoint.")
    for k, v in torch_pickle.read_state_dict(tuned_path).items():
        m = re.match(r"net\.slice\d\.(\d+)\.(.+)$", k)
        if m:
            tensors[f"net.features.{m[1]}.{m[2]}"] = v
            origin = tuned_path if (m[1], m[2]) == ("0", "weight") else origin
        elif re.match(r"lin\d\.model\.1\.weight$", k):
            tensors[k] = v
        elif not re.match(r"lins\.\d\.model\.1\.weight$", k):  # the ModuleList alias of lin{k}
            raise WeightsError(f"{tuned_path}: unexpected tensor {k!r} in an E-LatentLPIPS tuned checkpoint.")
    first = tensors.get("net.features.0.weight")
    enc = ENCODERS[encoder] if official else _custom_encoder(encoder, trunk_obj, first, origin)
    if first is not None and first.shape[1] != enc.channels:
        raise WeightsError(
            f"{origin}: first conv takes {first.shape[1]} latent channels, encoder {encoder!r} has "
            f"{enc.channels}; these files belong to another encoder."
        )
    source = f"{trunk_path} + {tuned_path}"
    widths = widths_from_tensors(tensors, source=source)
    module = PerceptualNet(in_channels=enc.channels, latent=True, dtype=dtype, widths=widths)
    return module, variables_from_torch(module, tensors, source=source)


def random_latent_lpips(encoder: str = "sd15", seed: int = 0, width: float | tuple[int, ...] | None = None) -> dict:
    """LatentLPIPS variables with RANDOM weights, for tiny/debug runs where the official files are absent.

    He-normal conv kernels, unit BN scales/variances, zero shifts/means, non-negative head weights (the official
    heads are non-negative), so the distance is a valid (if uncalibrated) perceptual distance: zero for identical
    inputs, positive otherwise. Never use it for a real run. `width`: a multiplier or 13 conv widths
    (`latent_vgg.scaled_widths`; default VGG16's).
    """
    from flax import traverse_util

    from d2g_jax.losses.latent_vgg import abstract_variables

    enc = check_encoder(encoder)
    abstract = abstract_variables(PerceptualNet(in_channels=enc.channels, latent=True, widths=scaled_widths(width)))
    rng = np.random.default_rng(seed)
    out = {}
    for path, spec in traverse_util.flatten_dict(abstract).items():
        shape, leaf = tuple(spec.shape), path[-1]
        if path[0] == "params" and leaf == "kernel" and any(str(p).startswith("lin") for p in path):
            v = rng.random(shape)  # official heads are O(1) per channel: distances of order 0.1–1
        elif leaf == "kernel":
            v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif leaf in ("scale", "var"):
            v = np.ones(shape)
        else:
            v = np.zeros(shape)
        out[path] = v.astype(np.float32)
    return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(out))


def e_latent_lpips(
    variables: dict,
    x0: jax.Array,
    x1: jax.Array,
    rng: jax.Array | None = None,
    *,
    preset: str = "bgco",
    l1: bool = True,
    normalize: bool = False,
    encoder: str = "sd15",
    mode: str = "ensemble",
    p: float = 1.0,
    return_layers: bool = False,
    dtype: Any = jnp.float32,
    aug_params: augment.AugmentParams | None = None,
    star_reduce: str = "mean",
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """(E-)LatentLPIPS distance between two batches of latents.

    Args:
      variables: from `load_latent_lpips`.
      x0, x1: [B, H, W, C] latents (NHWC), C matching `encoder`.
      rng: PRNG key for the augmentation (required unless `mode='plain'`).
      preset: augmentation preset (`augment.PRESETS`: b, g, c, o, co, bg, bgc, bgco, bgo).
      l1: add `mean |x0 − x1|` over (H, W, C), computed before augmentation.
      normalize: inputs are raw VAE-encoder outputs; apply the encoder's scale/shift first.
      encoder: sd15, sd21, sdxl (4 channels), sd3, flux (16 channels), or a registered custom latent space.
      mode: 'ensemble' (E-LatentLPIPS), 'plain' (LatentLPIPS), 'star' (mean of both, E-LatentLPIPS*).
      p: ADA augmentation strength (1 in the paper and the official package).
      return_layers: also return the per-layer distances [B, 5] (without the L1 term).
      dtype: trunk compute dtype.
      aug_params: an explicit augmentation instead of drawing one from `rng` (analysis, tests).
      star_reduce: `mode='star'` only: "mean" of the augmented and the plain distance (E-LatentLPIPS*'s scale
        equals E-LatentLPIPS's) or their "sum" (twice that scale; the L1 term is added once either way).

    Returns:
      distance [B] (and per-layer [B, 5] if `return_layers`).
    """
    enc = check_encoder(encoder)
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    if x0.ndim != 4 or x0.shape != x1.shape:
        raise ValueError(f"expected two [B, H, W, C] latents of one shape, got {x0.shape} and {x1.shape}")
    if x0.shape[-1] != enc.channels:
        raise ValueError(
            f"encoder {encoder!r} latents have {enc.channels} channels (NHWC: last axis), got shape {x0.shape}"
        )
    augment.check_preset(preset)
    if mode != "plain" and rng is None and aug_params is None:
        raise ValueError(f"mode={mode!r} augments its inputs and needs an rng key")
    if normalize:
        if enc.scale is None:
            raise ValueError(
                f"encoder {encoder!r} has no recorded scaling factor, so normalize=True cannot map raw encoder "
                "outputs; pass latents already in the diffusion space (normalize=False)."
            )
        x0, x1 = (x0 - enc.shift) * enc.scale, (x1 - enc.shift) * enc.scale
    net = PerceptualNet(in_channels=enc.channels, latent=True, dtype=dtype, widths=widths_from_variables(variables))
    if mode == "plain":
        layers = net.apply(variables, x0, x1)
    else:
        if aug_params is None:
            aug_params = augment.sample_params(rng, *x0.shape[:3], preset, p)
        a0, a1 = augment.apply_params(aug_params, x0, x1, preset)
        if mode == "ensemble":
            layers = net.apply(variables, a0, a1)
        else:  # one trunk pass over [augmented; plain]
            b = x0.shape[0]
            both = net.apply(variables, jnp.concatenate([a0, x0]), jnp.concatenate([a1, x1]))
            if star_reduce not in ("mean", "sum"):
                raise ValueError(f"star_reduce={star_reduce!r}: choose 'mean' or 'sum'")
            layers = both[:b] + both[b:]
            layers = layers / 2 if star_reduce == "mean" else layers
    dist = jnp.sum(layers, axis=-1)
    if l1:
        dist = dist + jnp.mean(jnp.abs(x0 - x1), axis=(1, 2, 3)).astype(dist.dtype)
    return (dist, layers) if return_layers else dist


def vae_decoder(module: Any, variables: dict) -> Callable[[jax.Array], jax.Array]:
    """`z ↦ image` for `pixel_lpips` from `d2g_jax.models.vae.load_vae(...)`: diffusion latents → [-1, 1] RGB."""
    return lambda z: module.apply(variables, z, method="decode_latents")


def pixel_lpips(
    variables: dict,
    x0: jax.Array,
    x1: jax.Array,
    decode: Callable[[jax.Array], jax.Array],
    *,
    return_layers: bool = False,
    dtype: Any = jnp.float32,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """ "LPIPS (pixel)" ablation (Table 1, Eq. 2): LPIPS-VGG on VAE-decoded latents.

    Args:
      variables: from `latent_vgg.load_pixel_lpips`.
      x0, x1: [B, h, w, 4] diffusion latents (as the U-Net produces them).
      decode: `z: [B, h, w, 4] → images [B, 8h, 8w, 3]` in [-1, 1], e.g. `vae_decoder(*load_vae(...))`.

    Returns:
      distance [B] (and per-layer [B, 5] if `return_layers`).
    """
    if x0.shape != x1.shape:
        raise ValueError(f"inputs differ in shape: {x0.shape} vs {x1.shape}")
    # Separate decoder calls: only the differentiated input's decode is back-propagated.
    layers = PerceptualNet(in_channels=3, latent=False, dtype=dtype).apply(variables, decode(x0), decode(x1))
    dist = jnp.sum(layers, axis=-1)
    return (dist, layers) if return_layers else dist
