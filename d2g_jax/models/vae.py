"""Flax port of diffusers' `AutoencoderKL`, the frozen SD/SDXL VAE: latents ↔ images (paper §3.1, §4 eval).

The decoder turns generated latents into images for evaluation (FID, CLIP score) and pixel-space losses; the
encoder maps real images to latents (the posterior mean, or a sample). Layout is NHWC:
`image: [B, H, W, 3]` in [-1, 1], `z: [B, H/f, W/f, C]` with `f = 2 ** (len(block_out_channels) - 1)` (8 for SD).

Latent conventions (one per method, named after what it takes):
* `encode(image) -> LatentDist`, `decode(z_vae) -> image` work in the VAE's own latent space (diffusers'
  `vae.encode(x).latent_dist` and `vae.decode(z).sample`, NHWC).
* `encode_latents(image) -> z` and `decode_latents(z) -> image` work in the *diffusion* latent space the U-Net
  sees: `z = (z_vae - shift_factor) * scaling_factor`, or with per-channel `latents_mean`/`latents_std` in the
  config `z = (z_vae - mean) * scaling_factor / std` (what the diffusers pipelines do before and after the U-Net).
  `decode_latents(unet_output)` is therefore the whole "latents → picture" step.
Decoded images are nominally in [-1, 1] and not clipped (as diffusers returns them); clip before converting
to pixels.

Attribute names equal the PyTorch ones (`decoder/up_blocks_0/resnets_1/conv1`, `mid_block/attentions_0/to_q`),
so a diffusers `vae/` folder maps through `convert.torch_to_flax` with no renames; pre-2023 checkpoints with the
deprecated attention names (`query`, `key`, `value`, `proj_attn`) are renamed on load as diffusers does.
`load_vae(folder, parts=("decoder",))` builds and loads the decoder alone, declaring the encoder tensors of the
full checkpoint as expected-but-unused (`VAE_PARTS`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2g_jax.models.blocks import (
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    attention_core,
    conv,
    dense,
    group_norm,
    remat_block,
)
from d2g_jax.models.convert import torch_to_flax
from d2g_jax.models.weights import UnsupportedConfigError, load_folder_tensors, read_config

Dtype = Any

# The PyTorch name prefixes of each part of `AutoencoderKL`; a partial load ignores the other part's tensors.
VAE_PARTS: dict[str, tuple[str, ...]] = {
    "encoder": (r"^encoder\.", r"^quant_conv\."),
    "decoder": (r"^decoder\.", r"^post_quant_conv\."),
}
# diffusers' `_fix_state_dict_keys_on_load`: attention blocks saved before the `Attention` refactor.
_DEPRECATED_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DEPRECATED_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


_FIXED: dict[str, tuple[Any, ...]] = {"act_fn": ("silu", "swish")}
_BENIGN = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size", "force_upcast"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyperparameters of diffusers' `AutoencoderKL` (field names, meaning and defaults as in its config.json).

    `scaling_factor` (0.18215 SD1.x/2.x, 0.13025 SDXL), `shift_factor` (SD3/Flux-style) and the per-channel
    `latents_mean`/`latents_std` define the diffusion latent space (see the module docstring).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downscale(self) -> int:
        """Spatial factor between images and latents (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], source: str = "config.json") -> VAEConfig:
        """Validates a diffusers `vae/config.json` dict; raises `UnsupportedConfigError` naming field and file."""
        cls_name = cfg.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise UnsupportedConfigError(f"{source}: _class_name is {cls_name!r}; only AutoencoderKL is supported.")
        known = {f.name for f in dataclasses.fields(cls)} | set(_FIXED) | _BENIGN
        known |= {"down_block_types", "up_block_types"}
        unknown = sorted(k for k in cfg if k not in known and not k.startswith("_"))
        if unknown:
            raise UnsupportedConfigError(
                f"{source}: unknown AutoencoderKL config fields {unknown}. d2g_jax cannot tell whether they change "
                "the network; remove them if they are benign or extend d2g_jax/models/vae.py."
            )
        for field, allowed in _FIXED.items():
            if field in cfg and cfg[field] not in allowed:
                raise UnsupportedConfigError(
                    f"{source}: `{field}` = {cfg[field]!r} is not supported (supported: {list(allowed)})."
                )
        d = cls()
        get = lambda k: cfg[k] if cfg.get(k) is not None else getattr(d, k)
        boc = tuple(int(c) for c in get("block_out_channels"))
        down = tuple(cfg.get("down_block_types") or ("DownEncoderBlock2D",))
        up = tuple(cfg.get("up_block_types") or ("UpDecoderBlock2D",))
        for field, types, want in (
            ("down_block_types", down, "DownEncoderBlock2D"),
            ("up_block_types", up, "UpDecoderBlock2D"),
        ):
            bad = [t for t in types if t != want]
            if bad:
                raise UnsupportedConfigError(f"{source}: `{field}` {bad} not supported (only {want!r}).")
            if len(types) != len(boc):
                raise UnsupportedConfigError(
                    f"{source}: `{field}` has {len(types)} entries for {len(boc)} block_out_channels."
                )
        groups = int(get("norm_num_groups"))
        if any(c % groups for c in boc):
            raise UnsupportedConfigError(
                f"{source}: block_out_channels {boc} are not divisible by norm_num_groups {groups}."
            )
        latent = int(get("latent_channels"))
        stats = {}
        for k in ("latents_mean", "latents_std"):
            v = cfg.get(k)
            if v is not None and len(v) != latent:
                raise UnsupportedConfigError(f"{source}: `{k}` has {len(v)} entries for {latent} latent channels.")
            stats[k] = tuple(float(x) for x in v) if v is not None else None
        if (stats["latents_mean"] is None) != (stats["latents_std"] is None):
            raise UnsupportedConfigError(f"{source}: `latents_mean` and `latents_std` must be given together.")
        shift = cfg.get("shift_factor")
        return cls(
            in_channels=int(get("in_channels")),
            out_channels=int(get("out_channels")),
            block_out_channels=boc,
            layers_per_block=int(get("layers_per_block")),
            latent_channels=latent,
            norm_num_groups=groups,
            scaling_factor=float(get("scaling_factor")),
            shift_factor=float(shift) if shift is not None else None,
            use_quant_conv=bool(get("use_quant_conv")),
            use_post_quant_conv=bool(get("use_post_quant_conv")),
            mid_block_add_attention=bool(get("mid_block_add_attention")),
            **stats,
        )


def scale_latents(config: VAEConfig, z_vae: jax.Array) -> jax.Array:
    """VAE latent space → diffusion latent space. z_vae: [B, h, w, C] → [B, h, w, C]."""
    if config.latents_mean is not None:
        mean, std = jnp.asarray(config.latents_mean), jnp.asarray(config.latents_std)
        return ((z_vae - mean) * config.scaling_factor / std).astype(z_vae.dtype)
    return (z_vae - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(config: VAEConfig, z: jax.Array) -> jax.Array:
    """Diffusion latent space → VAE latent space (the inverse of `scale_latents`). z: [B, h, w, C]."""
    if config.latents_mean is not None:
        mean, std = jnp.asarray(config.latents_mean), jnp.asarray(config.latents_std)
        return (z * std / config.scaling_factor + mean).astype(z.dtype)
    return z / config.scaling_factor + (config.shift_factor or 0.0)


class LatentDist(NamedTuple):
    """diffusers' `DiagonalGaussianDistribution`. mean, logvar: [B, h, w, C]; logvar clipped to [-30, 20]."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)


class VAEAttention(nn.Module):
    """The mid-block self-attention: GroupNorm → single-head attention over H·W tokens → to_out.0, + residual.

    diffusers `Attention(heads=C // C, dim_head=C, norm_num_groups, residual_connection=True, bias=True,
    rescale_output_factor=1)`. x: [B, H, W, C] → [B, H, W, C]. Logits and softmax run in fp32
    (`dot_product_attention` does so for bf16 inputs, matching `upcast_softmax`).
    """

    channels: int
    groups: int = 32
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.group_norm = group_norm(self.groups, self.eps, **kw)
        self.to_q = dense(self.channels, **kw)
        self.to_k = dense(self.channels, **kw)
        self.to_v = dense(self.channels, **kw)
        self.to_out_0 = dense(self.channels, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, c)
        o = attention_core(self.to_q(t), self.to_k(t), self.to_v(t), heads=1)
        return self.to_out_0(o).reshape(b, h, w, c) + x.astype(self.dtype)


class MidBlock(nn.Module):
    """`UNetMidBlock2D` without time embedding: resnets.0 → attentions.0 (optional) → resnets.1."""

    channels: int
    groups: int
    add_attention: bool = True
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = remat_block(ResnetBlock2D, self.remat_policy)
        self.resnets = [res(self.channels, self.groups, 1e-6, use_temb=False, **kw) for _ in range(2)]
        if self.add_attention:
            self.attentions = [remat_block(VAEAttention, self.remat_policy)(self.channels, self.groups, 1e-6, **kw)]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets, then (unless last) a stride-2 conv with diffusers' (0, 1, 0, 1) padding."""

    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = remat_block(ResnetBlock2D, self.remat_policy)
        self.resnets = [res(self.out_channels, self.groups, 1e-6, use_temb=False, **kw) for _ in range(self.num_layers)]
        if self.add_downsample:
            self.downsamplers = [Downsample2D(self.out_channels, padding=0, **kw)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.add_downsample else x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets, then (unless last) nearest ×2 upsampling and a 3×3 conv."""

    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = remat_block(ResnetBlock2D, self.remat_policy)
        self.resnets = [res(self.out_channels, self.groups, 1e-6, use_temb=False, **kw) for _ in range(self.num_layers)]
        if self.add_upsample:
            self.upsamplers = [Upsample2D(self.out_channels, **kw)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.add_upsample else x


class Encoder(nn.Module):
    """conv_in → down blocks → mid block → GroupNorm → SiLU → conv_out. image: [B, H, W, 3] → [B, h, w, 2C]."""

    config: VAEConfig
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bkw = dict(groups=c.norm_num_groups, remat_policy=self.remat_policy, **kw)
        n = len(c.block_out_channels)
        self.conv_in = conv(c.block_out_channels[0], 3, **kw)
        self.down_blocks = [
            DownEncoderBlock2D(ch, c.layers_per_block, add_downsample=i < n - 1, **bkw)
            for i, ch in enumerate(c.block_out_channels)
        ]
        self.mid_block = MidBlock(c.block_out_channels[-1], add_attention=c.mid_block_add_attention, **bkw)
        self.conv_norm_out = group_norm(c.norm_num_groups, 1e-6, **kw)
        self.conv_out = conv(2 * c.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x.astype(self.dtype))
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """conv_in → mid block → up blocks → GroupNorm → SiLU → conv_out. z: [B, h, w, C] → [B, H, W, 3]."""

    config: VAEConfig
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bkw = dict(groups=c.norm_num_groups, remat_policy=self.remat_policy, **kw)
        rev = tuple(reversed(c.block_out_channels))
        self.conv_in = conv(rev[0], 3, **kw)
        self.mid_block = MidBlock(rev[0], add_attention=c.mid_block_add_attention, **bkw)
        self.up_blocks = [
            UpDecoderBlock2D(ch, c.layers_per_block + 1, add_upsample=i < len(rev) - 1, **bkw)
            for i, ch in enumerate(rev)
        ]
        self.conv_norm_out = group_norm(c.norm_num_groups, 1e-6, **kw)
        self.conv_out = conv(c.out_channels, 3, **kw)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z.astype(self.dtype)))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """diffusers' `AutoencoderKL` (NHWC), optionally with only some of its `parts` ("encoder", "decoder").

    Call a part with `module.apply(variables, x, method="decode_latents")` (or `decode`, `encode`,
    `encode_latents`); `__call__` runs the full autoencoder on the posterior mean. Outputs are float32.
    """

    config: VAEConfig
    parts: tuple[str, ...] = ("encoder", "decoder")
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bad = [p for p in self.parts if p not in VAE_PARTS]
        if bad or not self.parts:
            raise ValueError(f"parts {self.parts} must be a non-empty subset of {tuple(VAE_PARTS)}.")
        if "encoder" in self.parts:
            self.encoder = Encoder(c, self.remat_policy, **kw)
            if c.use_quant_conv:
                self.quant_conv = conv(2 * c.latent_channels, 1, **kw)
        if "decoder" in self.parts:
            self.decoder = Decoder(c, self.remat_policy, **kw)
            if c.use_post_quant_conv:
                self.post_quant_conv = conv(c.latent_channels, 1, **kw)

    def _require(self, part: str) -> None:
        if part not in self.parts:
            raise ValueError(f"this AutoencoderKL was built with parts={self.parts}; {part!r} is not loaded.")

    def encode(self, image: jax.Array) -> LatentDist:
        """image: [B, H, W, in_channels] in [-1, 1] → posterior over VAE latents, each [B, H/f, W/f, C]."""
        self._require("encoder")
        moments = self.encoder(image)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return LatentDist(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, z_vae: jax.Array) -> jax.Array:
        """z_vae: [B, h, w, C] in VAE latent space → image [B, h·f, w·f, out_channels], nominally [-1, 1]."""
        self._require("decoder")
        z = z_vae.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def encode_latents(self, image: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """image: [B, H, W, 3] in [-1, 1] → diffusion latents [B, H/f, W/f, C] (posterior mean, or a sample)."""
        dist = self.encode(image)
        return scale_latents(self.config, dist.mean if rng is None else dist.sample(rng))

    def decode_latents(self, z: jax.Array) -> jax.Array:
        """z: [B, h, w, C] diffusion latents (what the U-Net produces) → image [B, h·f, w·f, 3], nominally [-1, 1]."""
        return self.decode(unscale_latents(self.config, z))

    def __call__(self, image: jax.Array) -> jax.Array:
        """Autoencode with the posterior mean (diffusers' `forward(sample_posterior=False)`)."""
        return self.decode(self.encode(image).mean)


# ----------------------------------------------------------------------------------------------------------
# Loading from a diffusers folder.


def _init_parts(module: AutoencoderKL, image: jax.Array, z: jax.Array) -> None:
    if "encoder" in module.parts:
        module.encode(image)
    if "decoder" in module.parts:
        module.decode(z)


def abstract_params(module: AutoencoderKL) -> dict[str, Any]:
    """The unboxed `params` tree of `jax.ShapeDtypeStruct` for the module's parts (no FLOPs, no random init)."""
    c = module.config
    image = jax.ShapeDtypeStruct((1, c.downscale, c.downscale, c.in_channels), jnp.float32)
    z = jax.ShapeDtypeStruct((1, 1, 1, c.latent_channels), jnp.float32)
    init = lambda x, y: module.init(jax.random.key(0), x, y, method=_init_parts)
    return nn.unbox(jax.eval_shape(init, image, z))["params"]


def canonical_names(tensors: dict[str, Any]) -> dict[str, Any]:
    """Renames deprecated attention tensors (`attentions.0.query.weight` → `attentions.0.to_q.weight`)."""
    out = {}
    for k, v in tensors.items():
        m = _DEPRECATED_RE.match(k)
        out[f"{m[1]}.{_DEPRECATED_ATTN[m[2]]}.{m[3]}" if m else k] = v
    return out


def load_vae(
    folder: str,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    parts: Sequence[str] = ("encoder", "decoder"),
    remat_policy: str = "none",
    variant: str | None = None,
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Builds the VAE from a diffusers `vae/` folder (or a pipeline folder holding `vae/`) and loads it.

    `parts=("decoder",)` loads only `decoder.*` and `post_quant_conv.*` (the encoder tensors are declared
    ignorable, everything else must match). Returns `(module, {"params": ...})` with host numpy leaves in
    `param_dtype`; missing, unexpected or mis-shaped tensors raise `WeightsError` naming them.
    """
    if os.path.isdir(os.path.join(folder, "vae")) and not os.path.isfile(os.path.join(folder, "config.json")):
        folder = os.path.join(folder, "vae")
    parts = tuple(parts)
    bad = [p for p in parts if p not in VAE_PARTS]
    if bad or not parts:
        raise ValueError(f"parts {parts} must be a non-empty subset of {tuple(VAE_PARTS)}.")
    config = VAEConfig.from_diffusers(read_config(folder), source=os.path.join(folder, "config.json"))
    module = AutoencoderKL(config, parts=parts, remat_policy=remat_policy, dtype=dtype, param_dtype=param_dtype)
    tensors = canonical_names(load_folder_tensors(folder, "diffusion_pytorch_model", variant))
    ignore = [p for part, pats in VAE_PARTS.items() if part not in parts for p in pats]
    params = torch_to_flax(abstract_params(module), tensors, source=folder, ignore=ignore)
    return module, {"params": params}
