"""Flax port of transformers' CLIP text encoders, the frozen prompt encoders of the teacher (paper §3.1, §4).

* SD1.x/2.x: `CLIPTextModel`; the U-Net context is `last_hidden_state` (after `final_layer_norm`).
* SDXL encoder 1: `CLIPTextModel`; the context part is the penultimate hidden state `hidden_states[-2]`.
* SDXL encoder 2: `CLIPTextModelWithProjection`; penultimate hidden state plus `text_embeds`, the
  final-LayerNorm'd state at the EOS token projected by `text_projection` (no bias).

One linen module covers both (`CLIPTextConfig.with_projection`). Attribute names equal the PyTorch ones
(`text_model/encoder/layers_3/self_attn/q_proj`), so `convert.torch_to_flax` maps a checkpoint without renames.
Both state-dict layouts load: the legacy one with the `text_model.` prefix (every SD/SDXL checkpoint on the Hub)
and the prefix-less one transformers >= 5 writes for `CLIPTextModel`.

Shapes: `input_ids: [B, T]` int, `attention_mask: [B, T]` (1 = token, 0 = padding), hidden states `[B, T, D]`,
`pooler_output: [B, D]`, `text_embeds: [B, P]`. The module is frozen in Diffusion2GAN (no gradients), so it has
no remat option; `dtype` sets the compute dtype (bf16 supported: LayerNorm statistics and the attention softmax
run in fp32), `param_dtype` the stored weights.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from d2g_jax.models.blocks import dense, layer_norm
from d2g_jax.models.convert import torch_to_flax
from d2g_jax.models.weights import UnsupportedConfigError, load_folder_tensors, read_config

Dtype = Any

ACTIVATIONS = ("quick_gelu", "gelu")
ARCHITECTURES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}
# transformers >= 5 saves `CLIPTextModel` without the `text_model.` prefix; these are its top-level children.
_UNPREFIXED_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
# Non-persistent buffers that older transformers versions wrote into checkpoints.
CLIP_IGNORE = (r"(^|\.)position_ids$",)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyperparameters of a transformers CLIP text model (names and defaults as in `CLIPTextConfig`).

    `with_projection` selects `CLIPTextModelWithProjection` (adds `text_projection`, [D] → [P], no bias).
    `eos_token_id == 2` is transformers' legacy marker (configs from before its PR #24773, i.e. the SD and SDXL
    checkpoints): the pooled token is then the argmax of the ids (EOS has the largest id in the CLIP vocab);
    otherwise it is the first position holding `eos_token_id`.
    `use_attention_mask` is the diffusers switch telling SD pipelines to pass the padding mask (default off).
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 512
    with_projection: bool = False
    use_attention_mask: bool = False

    @classmethod
    def from_transformers(
        cls, cfg: dict[str, Any], source: str = "config.json", with_projection: bool | None = None
    ) -> CLIPTextConfig:
        """Validates a transformers `config.json` dict; raises `UnsupportedConfigError` naming field and file.

        Unknown fields are allowed: transformers configs carry many generic ones (generation defaults, dtype,
        ids) that do not touch the encoder's math. The fields that do are checked here.
        `with_projection=None` reads it from `architectures` (default: no projection).
        """
        model_type = cfg.get("model_type", "clip_text_model")
        if model_type == "clip":
            raise UnsupportedConfigError(
                f"{source}: model_type 'clip' is a full CLIP (text + vision) config; pass a text-encoder folder "
                "(model_type 'clip_text_model', e.g. <pipeline>/text_encoder)."
            )
        if model_type != "clip_text_model":
            raise UnsupportedConfigError(f"{source}: model_type {model_type!r} is not 'clip_text_model'.")
        archs = cfg.get("architectures") or []
        known = [a for a in archs if a in ARCHITECTURES]
        if archs and not known:
            raise UnsupportedConfigError(
                f"{source}: architectures {archs} are not supported (supported: {list(ARCHITECTURES)})."
            )
        if with_projection is None:
            with_projection = ARCHITECTURES[known[0]] if known else False
        d = cls()
        get = lambda k: cfg[k] if cfg.get(k) is not None else getattr(d, k)
        act = get("hidden_act")
        if act not in ACTIVATIONS:
            raise UnsupportedConfigError(
                f"{source}: `hidden_act` = {act!r} is not supported (supported: {list(ACTIVATIONS)})."
            )
        eos = get("eos_token_id")
        if not isinstance(eos, int) or isinstance(eos, bool):
            raise UnsupportedConfigError(
                f"{source}: `eos_token_id` = {eos!r}; the pooled output needs a single integer EOS id."
            )
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        if hidden % heads:
            raise UnsupportedConfigError(
                f"{source}: `hidden_size` {hidden} is not divisible by `num_attention_heads` {heads}."
            )
        return cls(
            vocab_size=int(get("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            max_position_embeddings=int(get("max_position_embeddings")),
            hidden_act=act,
            layer_norm_eps=float(get("layer_norm_eps")),
            eos_token_id=eos,
            projection_dim=int(get("projection_dim")),
            with_projection=bool(with_projection),
            use_attention_mask=bool(cfg.get("use_attention_mask", False)),
        )


class CLIPTextOutput(NamedTuple):
    """Outputs of `CLIPTextModel`; under `jit` the unused ones cost nothing (XLA drops them).

    last_hidden_state: [B, T, D] after `final_layer_norm`.
    pooler_output: [B, D] the final-LayerNorm'd state at the EOS token.
    hidden_states: N + 1 arrays [B, T, D]: the embeddings, then every layer's output (no final LayerNorm);
      `hidden_states[-2]` is SDXL's penultimate context.
    text_embeds: [B, P] `text_projection(pooler_output)`, or None without a projection.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...]
    text_embeds: jax.Array | None


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)  # transformers' "gelu" is the exact erf form
    raise UnsupportedConfigError(f"hidden_act {name!r} is not supported (supported: {list(ACTIVATIONS)}).")


def _embed(num: int, features: int, *, dtype: Dtype, param_dtype: Dtype, axes: tuple[str, str]) -> nn.Embed:
    return nn.Embed(
        num,
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), axes),
    )


class CLIPTextEmbeddings(nn.Module):
    """`token_embedding(ids) + position_embedding(arange(T))`. ids: [B, T] → [B, T, D]."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.token_embedding = _embed(c.vocab_size, c.hidden_size, axes=("vocab", "embed"), **kw)
        self.position_embedding = _embed(c.max_position_embeddings, c.hidden_size, axes=("positions", "embed"), **kw)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        t = input_ids.shape[-1]
        if t > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {t} exceeds max_position_embeddings {self.config.max_position_embeddings}."
            )
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(t))[None]


class CLIPAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections (all biased). x: [B, T, D], mask: [B, 1, T, T]."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        d, kw = self.config.hidden_size, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.q_proj = dense(d, **kw)
        self.k_proj = dense(d, **kw)
        self.v_proj = dense(d, **kw)
        self.out_proj = dense(d, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, t, d = x.shape
        heads = self.config.num_attention_heads
        split = lambda a: a.reshape(b, t, heads, d // heads)
        # Logits and softmax run in fp32 inside dot_product_attention, as transformers' eager/sdpa paths do.
        o = jax.nn.dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask=mask, is_causal=mask is None
        )
        return self.out_proj(o.reshape(b, t, d))


class CLIPMLP(nn.Module):
    """`fc1 → hidden_act → fc2`. x: [B, T, D] → [B, T, D]."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc1 = dense(c.intermediate_size, **kw)
        self.fc2 = dense(c.hidden_size, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_activation(self.config.hidden_act)(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer: `x + attn(LN1(x))`, then `x + mlp(LN2(x))`."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.self_attn = CLIPAttention(c, **kw)
        self.layer_norm1 = layer_norm(c.layer_norm_eps, **kw)
        self.mlp = CLIPMLP(c, **kw)
        self.layer_norm2 = layer_norm(c.layer_norm_eps, **kw)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """`layers.0 … layers.N-1`; returns every intermediate state (embeddings first), N + 1 arrays [B, T, D]."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.layers = [CLIPEncoderLayer(self.config, **kw) for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, ...]:
        states = [x]
        for layer in self.layers:
            x = nn.with_logical_constraint(layer(x, mask), ("batch", "tokens", "embed"))
            states.append(x)
        return tuple(states)


class CLIPTextTransformer(nn.Module):
    """transformers' inner text model (`text_model.*`): embeddings → causal encoder → final_layer_norm → pool."""

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.embeddings = CLIPTextEmbeddings(c, **kw)
        self.encoder = CLIPEncoder(c, **kw)
        self.final_layer_norm = layer_norm(c.layer_norm_eps, **kw)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, ...]]:
        b, t = input_ids.shape
        mask = None  # None → causal only (lets dot_product_attention pick its fused causal path)
        if attention_mask is not None:
            causal = jnp.tril(jnp.ones((t, t), dtype=bool))
            mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
        states = self.encoder(self.embeddings(input_ids), mask)
        last = self.final_layer_norm(states[-1])
        if self.config.eos_token_id == 2:  # legacy configs: EOS is the largest id (first one on ties)
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:  # first occurrence of the EOS id (padding may also be EOS)
            eos_pos = jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = last[jnp.arange(b), eos_pos]
        return last, pooled, states


class CLIPTextModel(nn.Module):
    """`CLIPTextModel` / `CLIPTextModelWithProjection`: `text_model` (+ `text_projection` when configured).

    __call__(input_ids: [B, T] int, attention_mask: [B, T] | None) → `CLIPTextOutput`. Without a mask
    attention is causal only, as in the SD pipelines (which pass no mask unless `use_attention_mask`).
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextTransformer(self.config, **kw)
        if self.config.with_projection:
            self.text_projection = dense(self.config.projection_dim, use_bias=False, **kw)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        last, pooled, states = self.text_model(input_ids, attention_mask)
        embeds = self.text_projection(pooled) if self.config.with_projection else None
        return CLIPTextOutput(last, pooled, states, embeds)

    def final_norm(self, hidden: jax.Array) -> jax.Array:
        """`text_model.final_layer_norm` alone (SD pipelines' `clip_skip` normalises an earlier state)."""
        return self.text_model.final_layer_norm(hidden)


# ----------------------------------------------------------------------------------------------------------
# Loading from a transformers folder.


def canonical_names(tensors: dict[str, Any]) -> dict[str, Any]:
    """Adds the `text_model.` prefix transformers >= 5 omits when saving `CLIPTextModel` (legacy layout kept)."""
    return {("text_model." + k if k.startswith(_UNPREFIXED_ROOTS) else k): v for k, v in tensors.items()}


def abstract_params(module: CLIPTextModel) -> dict[str, Any]:
    """The unboxed `params` tree of `jax.ShapeDtypeStruct` (no FLOPs, no random init)."""
    ids = jax.ShapeDtypeStruct((1, module.config.max_position_embeddings), jnp.int32)
    return nn.unbox(jax.eval_shape(lambda i: module.init(jax.random.key(0), i), ids))["params"]


def load_clip_text(
    folder: str,
    *,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    with_projection: bool | None = None,
    variant: str | None = None,
) -> tuple[CLIPTextModel, dict[str, Any]]:
    """Builds a CLIP text model from a transformers folder (`config.json` + `model[.fp16].safetensors`).

    `folder` is e.g. `<pipeline>/text_encoder` or `<pipeline>/text_encoder_2`. `with_projection=None` follows
    `architectures` in config.json. Returns `(module, {"params": ...})` with host numpy leaves in
    `param_dtype`; missing, unexpected or mis-shaped tensors raise `WeightsError` naming them.
    """
    source = os.path.join(folder, "config.json")
    config = CLIPTextConfig.from_transformers(read_config(folder), source=source, with_projection=with_projection)
    module = CLIPTextModel(config, dtype=dtype, param_dtype=param_dtype)
    tensors = canonical_names(load_folder_tensors(folder, "model", variant))
    params = torch_to_flax(abstract_params(module), tensors, source=folder, ignore=CLIP_IGNORE)
    return module, {"params": params}
