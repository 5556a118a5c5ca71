"""Flax port of diffusers' `UNet2DConditionModel` (SD1.x/2.x and SDXL-Base), the teacher, the generator and
the discriminator backbone of Diffusion2GAN (paper §3.1 eq. 8, §3.3 Fig. 7).

Layout is NHWC: `sample: [B, H, W, Cin]`, `encoder_hidden_states: [B, S, D]`, SDXL `text_embeds: [B, P]`,
`time_ids: [B, 6]`.

The discriminator seam (paper Fig. 7): `__call__` takes `down_block_additional_inputs`, one optional tensor per
down block added to the hidden state entering that block (block 0: right after `conv_in`), and with
`return_features=True` also returns a `UNetFeatures` record with the per-resolution encoder outputs, the
bottleneck, and for every up block the three decoder streams the multi-scale read-outs use: the upsampled
path entering the block (`hidden_in`), the skip connections it consumes (`skips`) and the combined features
it produces before its upsampler (`out`). The discriminator wraps this module; it never copies it.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from d2g_jax.models.blocks import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    conv,
    group_norm,
    remat_block,
    timestep_embedding,
)
from d2g_jax.models.unet_config import UNetConfig

Dtype = Any
_ACT = ("batch", "height", "width", "channels")  # logical axes of NHWC activations


class UpFeatures(NamedTuple):
    hidden_in: jax.Array  # [B, H, W, C]: upsampled bottleneck path entering the block
    skips: tuple[jax.Array, ...]  # skip connections consumed, in consumption order
    out: jax.Array  # combined features at this resolution (before the upsampler)


class UNetFeatures(NamedTuple):
    down: tuple[jax.Array, ...]  # output of each down block at its own resolution (before its downsampler)
    mid: jax.Array  # bottleneck output
    up: tuple[UpFeatures, ...]  # one per up block, coarse to fine


class _BlockArgs(nn.Module):
    """Fields shared by the U-Net blocks."""

    out_channels: int
    num_layers: int
    heads: int = 8
    transformer_layers: int = 1
    has_attention: bool = True
    add_sample_op: bool = True  # downsampler / upsampler
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    downsample_padding: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    remat_policy: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _kw(self):
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _resnet(self):
        return remat_block(ResnetBlock2D, self.remat_policy)(
            self.out_channels, self.groups, self.eps, output_scale_factor=self.output_scale_factor, **self._kw()
        )

    def _attention(self):
        return remat_block(Transformer2DModel, self.remat_policy)(
            self.heads,
            self.out_channels // self.heads,
            self.transformer_layers,
            self.groups,
            use_linear_projection=self.use_linear_projection,
            upcast_attention=self.upcast_attention,
            **self._kw(),
        )


class DownBlock(_BlockArgs):
    """`CrossAttnDownBlock2D` (has_attention) or `DownBlock2D`. Returns (h, skip tensors)."""

    def setup(self):
        self.resnets = [self._resnet() for _ in range(self.num_layers)]
        if self.has_attention:
            self.attentions = [self._attention() for _ in range(self.num_layers)]
        if self.add_sample_op:
            self.downsamplers = [Downsample2D(self.out_channels, self.downsample_padding, **self._kw())]

    def __call__(self, h, temb, context):
        skips = []
        for i in range(self.num_layers):
            h = self.resnets[i](h, temb)
            if self.has_attention:
                h = self.attentions[i](h, context)
            skips.append(h)
        out = h
        if self.add_sample_op:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, tuple(skips), out


class UpBlock(_BlockArgs):
    """`CrossAttnUpBlock2D` (has_attention) or `UpBlock2D`: concat skip → resnet (→ attention) per layer."""

    def setup(self):
        self.resnets = [self._resnet() for _ in range(self.num_layers)]
        if self.has_attention:
            self.attentions = [self._attention() for _ in range(self.num_layers)]
        if self.add_sample_op:
            self.upsamplers = [Upsample2D(self.out_channels, **self._kw())]

    def __call__(self, h, skips, temb, context, upsample_size=None):
        hidden_in = h
        for i in range(self.num_layers):
            h = jnp.concatenate([h, skips[-1 - i].astype(h.dtype)], axis=-1)
            h = self.resnets[i](h, temb)
            if self.has_attention:
                h = self.attentions[i](h, context)
        feats = UpFeatures(hidden_in, tuple(reversed(skips)), h)
        if self.add_sample_op:
            h = self.upsamplers[0](h, upsample_size)
        return h, feats


class MidBlock(_BlockArgs):
    """`UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) × num_layers."""

    def setup(self):
        self.resnets = [self._resnet() for _ in range(self.num_layers + 1)]
        self.attentions = [self._attention() for _ in range(self.num_layers)]

    def __call__(self, h, temb, context):
        h = self.resnets[0](h, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            h = resnet(attn(h, context), temb)
        return h


class UNet2DConditionModel(nn.Module):
    """ε/v-prediction U-Net: (sample [B,H,W,Cin], timesteps [B] or [], context [B,S,D]) → [B,H,W,Cout].

    Attributes:
      config: the validated hyperparameters (`UNetConfig.from_diffusers(json)`).
      dtype: compute dtype (bf16 supported; norms and softmax statistics stay fp32).
      param_dtype: parameter storage dtype (fp32 master weights for training).
      remat_policy: `jax.checkpoint_policies` name applied per resnet/transformer block, or 'none'.
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"

    def setup(self):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if c.dropout:
            logging.warning("UNet config dropout=%s: this port runs the network without dropout.", c.dropout)
        boc = c.block_out_channels
        self.conv_in = conv(boc[0], c.conv_in_kernel, **kw)
        self.time_embedding = TimestepEmbedding(c.time_embed_dim, **kw)
        if c.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(c.time_embed_dim, **kw)
        common = dict(
            groups=c.norm_num_groups,
            eps=c.norm_eps,
            use_linear_projection=c.use_linear_projection,
            upcast_attention=c.upcast_attention,
            remat_policy=self.remat_policy,
            **kw,
        )
        n = len(boc)
        self.down_blocks = [
            DownBlock(
                boc[i],
                c.layers_per_block[i],
                c.num_attention_heads[i],
                c.transformer_layers_per_block[i],
                has_attention=t.startswith("CrossAttn"),
                add_sample_op=i < n - 1,
                output_scale_factor=c.resnet_out_scale_factor,
                downsample_padding=c.downsample_padding,
                **common,
            )
            for i, t in enumerate(c.down_block_types)
        ]
        self.mid_block = MidBlock(
            boc[-1],
            1,
            c.num_attention_heads[-1],
            c.transformer_layers_per_block[-1],
            output_scale_factor=c.mid_block_scale_factor,
            **common,
        )
        rboc, rheads, rlayers = boc[::-1], c.num_attention_heads[::-1], c.layers_per_block[::-1]
        self.up_blocks = [
            UpBlock(
                rboc[i],
                rlayers[i] + 1,
                rheads[i],
                c.reverse_transformer_layers_per_block[i],
                has_attention=t.startswith("CrossAttn"),
                add_sample_op=i < n - 1,
                output_scale_factor=c.resnet_out_scale_factor,
                **common,
            )
            for i, t in enumerate(c.up_block_types)
        ]
        self.conv_norm_out = group_norm(c.norm_num_groups, c.norm_eps, **kw)
        self.conv_out = conv(c.out_channels, c.conv_out_kernel, **kw)

    def time_embed(self, timesteps: jax.Array, batch: int, text_embeds=None, time_ids=None) -> jax.Array:
        """Timestep (+ SDXL text/size) embedding: → temb [B, time_embed_dim]."""
        c = self.config
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
        temb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        emb = self.time_embedding(temb.astype(self.dtype))
        if c.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError(
                    "this U-Net is SDXL-style (addition_embed_type='text_time'): pass text_embeds "
                    "[B, P] and time_ids [B, 6]."
                )
            tid = timestep_embedding(
                jnp.asarray(time_ids, jnp.float32).reshape(-1),
                c.addition_time_embed_dim,
                c.flip_sin_to_cos,
                c.freq_shift,
            ).reshape(batch, -1)
            add = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), tid], axis=-1)
            emb = emb + self.add_embedding(add.astype(self.dtype))
        return emb

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
        *,
        down_block_additional_inputs: tuple[jax.Array | None, ...] | None = None,
        return_features: bool = False,
    ):
        """Runs the U-Net.

        Args:
          sample: [B, H, W, Cin] noisy latent.
          timesteps: [B] or scalar diffusion timestep(s) (float or int).
          encoder_hidden_states: [B, S, D] text context.
          text_embeds, time_ids: SDXL added conditions, [B, P] pooled text embedding and [B, 6] size/crop ids.
          down_block_additional_inputs: optional tuple (one per down block, entries may be None) of
            [B, H_i, W_i, C_i] tensors added to the hidden state entering down block i (discriminator inputs).
          return_features: also return `UNetFeatures` (per-resolution encoder/decoder features).

        Returns:
          [B, H, W, Cout] prediction in fp32, or `(prediction, UNetFeatures)`.
        """
        c = self.config
        b = sample.shape[0]
        x = sample.astype(self.dtype)
        if c.center_input_sample:
            x = 2 * x - 1.0
        ctx = encoder_hidden_states.astype(self.dtype)
        temb = self.time_embed(timesteps, b, text_embeds, time_ids)
        extra = down_block_additional_inputs or (None,) * len(self.down_blocks)
        if len(extra) != len(self.down_blocks):
            raise ValueError(
                f"down_block_additional_inputs has {len(extra)} entries for {len(self.down_blocks)} down blocks."
            )

        h = self.conv_in(x)
        skips = [h]
        down_feats = []
        for block, e in zip(self.down_blocks, extra):
            if e is not None:
                h = h + e.astype(h.dtype)
            h, res, out = block(h, temb, ctx)
            h = nn.with_logical_constraint(h, _ACT)
            skips.extend(res)
            down_feats.append(out)
        h = self.mid_block(h, temb, ctx)
        mid = h
        up_feats = []
        for block in self.up_blocks:
            n = block.num_layers
            res, skips = skips[-n:], skips[:-n]
            # The next block's skip fixes the upsampled size (odd sizes, as diffusers' forward_upsample_size).
            size = skips[-1].shape[1:3] if skips else None
            h, feats = block(h, tuple(res), temb, ctx, size)
            h = nn.with_logical_constraint(h, _ACT)
            up_feats.append(feats)
        h = nn.silu(self.conv_norm_out(h))
        out = self.conv_out(h).astype(jnp.float32)
        if return_features:
            return out, UNetFeatures(tuple(down_feats), mid, tuple(up_feats))
        return out


# ----------------------------------------------------------------------------------------------------------
# Loading from / exporting to a diffusers folder.

UNET_RENAMES = ((r"\.linear\.(\d)\.", r".linear_\1."),)  # diffusers' TimestepEmbedding.linear_1/linear_2


def dummy_inputs(config: UNetConfig, batch: int = 1, size: int | None = None, seq: int = 8) -> dict[str, Any]:
    """Abstract-shape inputs for `init`/`eval_shape` (parameter shapes do not depend on H, W or S)."""
    s = size or 2 ** max(config.num_upsamplers, 1)
    kw = dict(
        sample=jax.ShapeDtypeStruct((batch, s, s, config.in_channels), jnp.float32),
        timesteps=jax.ShapeDtypeStruct((batch,), jnp.float32),
        encoder_hidden_states=jax.ShapeDtypeStruct((batch, seq, config.cross_attention_dim[0]), jnp.float32),
    )
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kw["text_embeds"] = jax.ShapeDtypeStruct((batch, pooled), jnp.float32)
        kw["time_ids"] = jax.ShapeDtypeStruct((batch, 6), jnp.float32)
    return kw


def abstract_variables(module: UNet2DConditionModel) -> dict[str, Any]:
    """`jax.eval_shape` of `module.init`: the boxed (logically partitioned) variable tree, no FLOPs spent."""
    return jax.eval_shape(lambda kw: module.init(jax.random.key(0), **kw), dummy_inputs(module.config))


def load_unet(
    folder: str,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    remat_policy: str = "none",
    variant: str | None = None,
) -> tuple[UNet2DConditionModel, dict[str, Any]]:
    """Builds the U-Net from `folder/config.json` and loads its safetensors weights (no random init).

    `folder` is a diffusers `unet/` folder, or a pipeline folder containing `unet/`. Returns
    `(module, {"params": ...})` with host numpy leaves in `param_dtype`; `jax.device_put` them with the
    shardings from `d2g_jax.sharding`.
    """
    from d2g_jax.models.convert import torch_to_flax
    from d2g_jax.models.weights import load_folder_tensors, read_config

    if os.path.isdir(os.path.join(folder, "unet")) and not os.path.isfile(os.path.join(folder, "config.json")):
        folder = os.path.join(folder, "unet")
    config = UNetConfig.from_diffusers(read_config(folder), source=os.path.join(folder, "config.json"))
    module = UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype, remat_policy=remat_policy)
    abstract = nn.unbox(abstract_variables(module))["params"]
    tensors = load_folder_tensors(folder, "diffusion_pytorch_model", variant)
    params = torch_to_flax(abstract, tensors, renames=UNET_RENAMES, source=folder)
    return module, {"params": params}


def save_unet(folder: str, config: UNetConfig, variables: dict[str, Any], dtype: Any = None) -> None:
    """Writes a diffusers `unet` folder (config.json + diffusion_pytorch_model.safetensors).

    Refuses to overwrite an existing, non-empty folder (pass a fresh path).
    """
    from d2g_jax.models.convert import flax_to_torch
    from d2g_jax.models.weights import write_safetensors

    if os.path.isdir(folder) and os.listdir(folder):
        raise FileExistsError(f"{folder}: export target exists and is not empty; choose a new folder.")
    os.makedirs(folder, exist_ok=True)
    params = variables.get("params", variables)
    tensors = flax_to_torch(nn.unbox(params), renames=UNET_RENAMES, dtype=dtype)
    write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config.to_diffusers(), f, indent=2, sort_keys=True)
