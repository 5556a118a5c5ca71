"""Flax building blocks of the Stable Diffusion U-Net and VAE, mirroring diffusers' PyTorch modules.

Attribute names equal the PyTorch ones (`norm1`, `conv1`, `time_emb_proj`, `to_q`, `to_out_0`, `ff/net_0/proj`)
so `convert.py` maps checkpoints with a rename table. Layout is NHWC throughout:
`x: [B, H, W, C]`, token sequences `[B, T, D]`.

Every parameter carries logical axis names (see `d2g_jax/sharding.py` for the rules that map them to mesh axes):
conv kernels `("conv_h", "conv_w", "conv_in", "conv_out")`, dense kernels `("dense_in", "dense_out")`,
biases/norm scales by their output axis.
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def conv(
    features: int,
    kernel: int = 3,
    stride: int = 1,
    padding: int | None = None,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    use_bias: bool = True,
    name: str | None = None,
) -> nn.Conv:
    """A PyTorch-equivalent `nn.Conv2d` (symmetric integer padding, NHWC)."""
    p = kernel // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((p, p), (p, p)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("conv_h", "conv_w", "conv_in", "conv_out")
        ),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
        name=name,
    )


def dense(
    features: int, *, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True, name: str | None = None
) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("dense_in", "dense_out")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("dense_out",)),
        name=name,
    )


def group_norm(groups: int, eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
    # Statistics are computed in fp32 by flax; the two-pass variance matches torch's numerics.
    return nn.GroupNorm(
        num_groups=groups,
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def layer_norm(eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def timestep_embedding(
    t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
    """diffusers' `get_timestep_embedding`: t [B] → [B, dim] sinusoidal features (fp32)."""
    half = dim // 2
    exponent = -jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def remat_block(cls: type[nn.Module], policy: str) -> type[nn.Module]:
    """Wraps a block class in `nn.remat` with a `jax.checkpoint_policies` policy name ('none' = no remat)."""
    if policy in (None, "", "none"):
        return cls
    if not hasattr(jax.checkpoint_policies, policy):
        raise ValueError(f"remat_policy {policy!r} is not a jax.checkpoint_policies name (e.g. 'nothing_saveable').")
    return nn.remat(cls, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=True)


class TimestepEmbedding(nn.Module):
    """`linear_1 → SiLU → linear_2` (diffusers `TimestepEmbedding`, default act)."""

    time_embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.linear_1 = dense(self.time_embed_dim, **kw)
        self.linear_2 = dense(self.time_embed_dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → conv1 (+ time embedding) → GroupNorm → SiLU → dropout → conv2, plus shortcut.

    `temb_channels=None` drops the time projection (VAE). x: [B, H, W, Cin] → [B, H, W, out_channels].
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    use_temb: bool = True
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(group_norm(self.groups, self.eps, name="norm1", **kw)(x))
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        if self.use_temb:
            t = dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :].astype(h.dtype)
        h = nn.silu(group_norm(self.groups, self.eps, name="norm2", **kw)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        out = x.astype(h.dtype) + h
        return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv (`downsamplers.0.conv`); `padding=0` pads (0, 1, 0, 1) first, as diffusers does."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(
            self.out_channels,
            3,
            stride=2,
            padding=self.padding,
            name="conv",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour ×2 (or to `size`) then a 3×3 conv (`upsamplers.0.conv`)."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        b, h, w, c = x.shape
        th, tw = size or (2 * h, 2 * w)
        if (th, tw) == (2 * h, 2 * w):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        else:  # torch 'nearest': src = floor(dst * in / out)
            x = x[:, (jnp.arange(th) * h) // th][:, :, (jnp.arange(tw) * w) // tw]
        return conv(self.out_channels, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


def _softmax_attention_2d(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """One head, one query block: q [Tq, H], k/v [Tk, H] → [Tq, H] (fp32 softmax statistics)."""
    s = jnp.dot(q * (q.shape[-1] ** -0.5), k.T, preferred_element_type=jnp.float32)
    p = jnp.exp(s - s.max(-1, keepdims=True))
    o = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (o / p.sum(-1, keepdims=True)).astype(q.dtype)


def _blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_elems: int = 2**21) -> jax.Array:
    """Per-head, query-blocked attention for XLA:CPU. q: [B, Tq, N, H], k/v: [B, Tk, N, H].

    XLA:CPU runs batched dots with small head dims slowly and materialises the whole [N, Tq, Tk] score tensor;
    mapping over heads and query blocks keeps each score block (~8 MB) in cache and uses plain 2-D GEMMs
    (≈4-6× faster than `jax.nn.dot_product_attention` on CPU for SD's 4096-token self-attention).
    """
    b, tq, n, h = q.shape
    tk = k.shape[1]
    blk = max(1, min(tq, block_elems // tk))
    nblk = -(-tq // blk)
    pad = nblk * blk - tq
    heads_first = lambda a: a.transpose(0, 2, 1, 3).reshape(b * n, a.shape[1], h)
    qh = heads_first(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else q)

    def per_head(args):
        qq, kk, vv = args
        o = jax.lax.map(lambda qb: _softmax_attention_2d(qb, kk, vv), qq.reshape(nblk, blk, h))
        return o.reshape(nblk * blk, h)

    o = jax.lax.map(per_head, (qh, heads_first(k), heads_first(v)))
    return o.reshape(b, n, nblk * blk, h)[:, :, :tq].transpose(0, 2, 1, 3)


_IMPL_OVERRIDE: list[str] = []  # innermost `attention_implementation(...)` scope wins


@contextlib.contextmanager
def attention_implementation(impl: str):
    """Forces `attention_core`'s automatic choice to `impl` while tracing inside the scope.

    The discriminator's R1 penalty differentiates twice through attention; cuDNN's flash kernel has no second
    derivative, so that path is traced under `attention_implementation("xla")`.
    """
    _IMPL_OVERRIDE.append(impl)
    try:
        yield
    finally:
        _IMPL_OVERRIDE.pop()


def attention_core(
    q: jax.Array, k: jax.Array, v: jax.Array, heads: int, upcast: bool = False, impl: str | None = None
) -> jax.Array:
    """Multi-head softmax attention (scale 1/√H). q: [B, Tq, D], k/v: [B, Tk, D] → [B, Tq, D].

    impl: 'xla' → `jax.nn.dot_product_attention` with XLA's implementation; 'cudnn' → its cuDNN flash-attention
    kernel (GPU, bf16/fp16 only); 'blocked' → `_blocked_attention`. None picks 'blocked' on CPU for large score
    tensors (≥ 2²⁰ elements per head; smaller ones gain nothing from blocking), 'cudnn' on GPU for half-precision
    inputs with even sequence lengths when cuDNN accepts the shapes (it refuses at trace time otherwise), and
    'xla' elsewhere.
    """
    b, tq, d = q.shape
    dtype = q.dtype
    if upcast:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, a.shape[2] // heads)
    if impl is None and _IMPL_OVERRIDE:
        impl = _IMPL_OVERRIDE[-1]
    if impl is None:
        backend = jax.default_backend()
        if backend == "cpu" and tq * k.shape[1] >= 2**20:
            impl = "blocked"
        elif backend == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16) and tq % 2 == 0 and k.shape[1] % 2 == 0:
            # cuDNN's training kernels refuse odd sequence lengths (SD's 77-token cross-attention), and under
            # remat that refusal comes when the backward is traced, after this try: so odd lengths go to XLA
            # up front (measured on an H200, jax 0.11.2: "Unsupported sequence length Q 4096, KV 77").
            try:
                o = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation="cudnn")
                return o.reshape(b, tq, -1).astype(dtype)
            except Exception:  # noqa: BLE001 - cuDNN refuses this shape/version: XLA's path computes the same
                impl = "xla"
        else:
            impl = "xla"
    if impl == "blocked":
        o = _blocked_attention(split(q), split(k), split(v))
    elif impl in ("xla", "cudnn"):
        o = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation=impl)
    else:
        raise ValueError(f"attention impl {impl!r}: use 'xla', 'cudnn' or 'blocked'.")
    return o.reshape(b, tq, -1).astype(dtype)


class Attention(nn.Module):
    """diffusers `Attention` (AttnProcessor2_0 math): to_q/to_k/to_v, softmax(qkᵀ/√d)v, to_out.0.

    x: [B, T, Dq]; context: [B, S, Dk] or None for self-attention. `bias` adds biases to q/k/v (VAE);
    the optional `group_norm` and residual are the VAE mid-block form.
    """

    query_dim: int
    heads: int
    dim_head: int
    bias: bool = False
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.dim_head
        self.to_q = dense(inner, use_bias=self.bias, **kw)
        self.to_k = dense(inner, use_bias=self.bias, **kw)
        self.to_v = dense(inner, use_bias=self.bias, **kw)
        self.to_out_0 = dense(self.query_dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        ctx = x if context is None else context.astype(self.dtype)
        o = attention_core(self.to_q(x), self.to_k(ctx), self.to_v(ctx), self.heads, self.upcast_attention)
        return self.to_out_0(o)


class GEGLU(nn.Module):
    dim_out: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = dense(self.dim_out * 2, name="proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        h, gate = jnp.split(h, 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """`ff.net.0` = GEGLU(dim → 4·dim), `ff.net.2` = Linear(4·dim → dim)."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.net_0 = GEGLU(self.dim * self.mult, **kw)
        self.net_2 = dense(self.dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net_2(self.net_0(x))


class BasicTransformerBlock(nn.Module):
    """LayerNorm → self-attn, LayerNorm → cross-attn on the text context, LayerNorm → GEGLU FF; residual each."""

    dim: int
    heads: int
    dim_head: int
    norm_eps: float = 1e-5
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        akw = dict(heads=self.heads, dim_head=self.dim_head, upcast_attention=self.upcast_attention, **kw)
        self.norm1 = layer_norm(self.norm_eps, **kw)
        self.attn1 = Attention(self.dim, **akw)
        self.norm2 = layer_norm(self.norm_eps, **kw)
        self.attn2 = Attention(self.dim, **akw)
        self.norm3 = layer_norm(self.norm_eps, **kw)
        self.ff = FeedForward(self.dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm → proj_in (1×1 conv or linear) → blocks → proj_out, plus residual.

    x: [B, H, W, C], context: [B, S, Dctx] → [B, H, W, C].
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = group_norm(self.groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            x = dense(inner, name="proj_in", **kw)(x.reshape(b, h * w, c))
        else:
            x = conv(inner, 1, name="proj_in", **kw)(x).reshape(b, h * w, inner)
        x = nn.with_logical_constraint(x, ("batch", "tokens", "embed"))
        for i in range(self.num_layers):
            x = BasicTransformerBlock(
                inner,
                self.heads,
                self.dim_head,
                self.norm_eps,
                self.upcast_attention,
                name=f"transformer_blocks_{i}",
                **kw,
            )(x, context)
        if self.use_linear_projection:
            x = dense(c, name="proj_out", **kw)(x).reshape(b, h, w, c)
        else:
            x = conv(c, 1, name="proj_out", **kw)(x.reshape(b, h, w, inner))
        return x + residual.astype(x.dtype)
