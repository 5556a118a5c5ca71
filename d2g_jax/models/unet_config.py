"""The U-Net's hyperparameters, parsed and validated from a diffusers `unet/config.json`.

`UNetConfig.from_diffusers` accepts what SD1.x/2.x and SDXL-Base checkpoints use and raises
`UnsupportedConfigError` (naming the field, the value and the file) for anything that would change the math
in a way this port does not implement — never a silent fallback. `to_diffusers()` writes a config that
`diffusers.UNet2DConditionModel.from_pretrained` rebuilds the same network from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from d2g_jax.models.weights import UnsupportedConfigError

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn",)

# Fields whose only supported values are listed (diffusers' defaults). Anything else changes the math.
_FIXED: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu", "swish"),
    "attention_type": ("default",),
    "class_embed_type": (None,),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "mid_block_only_cross_attention": (None, False),
    "num_attention_heads": (None,),  # diffusers itself rejects it (attention_head_dim means heads)
    "num_class_embeds": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_time_scale_shift": ("default",),
    "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,),
    "time_embedding_type": ("positional",),
    "timestep_post_act": (None,),
    "addition_embed_type": (None, "text_time"),
}
# Fields that do not change the forward computation.
_BENIGN = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "sample_size",
    "addition_embed_type_num_heads",
    "dropout",
    "_use_default_values",
}


def _per_block(value: Any, n: int, field: str, source: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UnsupportedConfigError(f"{source}: `{field}` has {len(value)} entries for {n} blocks.")
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of `UNet2DConditionModel` (field names and meaning as in diffusers' config.json).

    Per-block fields are tuples over the down blocks (`transformer_layers_per_block`, `num_attention_heads`,
    `cross_attention_dim`, `layers_per_block`); `reverse_transformer_layers_per_block` is per up block.
    `num_attention_heads[i]` is the *head count* of block i (diffusers calls it `attention_head_dim`).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    reverse_transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_attention_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: tuple[int, ...] = (768, 768, 768, 768)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embedding_dim: int | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    only_cross_attention: bool = False
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    resnet_out_scale_factor: float = 1.0
    center_input_sample: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    sample_size: int | None = 64
    dropout: float = 0.0

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def num_upsamplers(self) -> int:
        return len(self.block_out_channels) - 1

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any], source: str = "config.json") -> UNetConfig:
        """Validates a diffusers config dict; raises `UnsupportedConfigError` naming the field and file."""
        known = {f.name for f in dataclasses.fields(cls)} | set(_FIXED) | _BENIGN | {"attention_head_dim"}
        unknown = sorted(k for k in cfg if k not in known and not k.startswith("_"))
        if unknown:
            raise UnsupportedConfigError(
                f"{source}: unknown UNet config fields {unknown}. d2g_jax cannot tell whether they change the "
                "network; remove them if they are benign or extend d2g_jax/models/unet_config.py."
            )
        if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
            raise UnsupportedConfigError(
                f"{source}: _class_name is {cfg['_class_name']!r}; only UNet2DConditionModel is supported."
            )
        for field, allowed in _FIXED.items():
            if field in cfg and cfg[field] not in allowed:
                raise UnsupportedConfigError(
                    f"{source}: `{field}` = {cfg[field]!r} is not supported (supported: {list(allowed)})."
                )
        if cfg.get("addition_embed_type") == "text_time" and (
            cfg.get("addition_time_embed_dim") is None or cfg.get("projection_class_embeddings_input_dim") is None
        ):
            raise UnsupportedConfigError(
                f"{source}: addition_embed_type 'text_time' needs `addition_time_embed_dim` and "
                "`projection_class_embeddings_input_dim`."
            )
        d = cls()
        get = lambda k: cfg[k] if cfg.get(k) is not None else getattr(d, k)
        down = tuple(cfg.get("down_block_types", d.down_block_types))
        up = tuple(cfg.get("up_block_types", d.up_block_types))
        boc = tuple(cfg.get("block_out_channels", d.block_out_channels))
        n = len(down)
        for t in down:
            if t not in DOWN_TYPES:
                raise UnsupportedConfigError(f"{source}: down block type {t!r} is not supported ({DOWN_TYPES}).")
        for t in up:
            if t not in UP_TYPES:
                raise UnsupportedConfigError(f"{source}: up block type {t!r} is not supported ({UP_TYPES}).")
        mid = cfg.get("mid_block_type", d.mid_block_type)
        if mid not in MID_TYPES:
            raise UnsupportedConfigError(f"{source}: mid_block_type {mid!r} is not supported ({MID_TYPES}).")
        if len(up) != n or len(boc) != n:
            raise UnsupportedConfigError(
                f"{source}: down_block_types ({n}), up_block_types ({len(up)}) and block_out_channels "
                f"({len(boc)}) must have the same length."
            )
        oca = cfg.get("only_cross_attention", False)
        if oca if isinstance(oca, bool) else any(oca):
            raise UnsupportedConfigError(f"{source}: `only_cross_attention` = {oca!r} is not supported.")
        if cfg.get("norm_num_groups", 32) is None:
            raise UnsupportedConfigError(f"{source}: `norm_num_groups` = None (no output norm) is not supported.")
        tlpb = cfg.get("transformer_layers_per_block", 1)
        if isinstance(tlpb, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in tlpb):
            raise UnsupportedConfigError(
                f"{source}: per-layer nested `transformer_layers_per_block` {tlpb!r} is not supported."
            )
        tlpb = _per_block(tlpb, n, "transformer_layers_per_block", source)
        rev = cfg.get("reverse_transformer_layers_per_block")
        if rev is not None and any(isinstance(x, (list, tuple)) for x in rev):
            raise UnsupportedConfigError(f"{source}: nested `reverse_transformer_layers_per_block` is not supported.")
        rev = tuple(rev) if rev is not None else tuple(reversed(tlpb))
        heads = _per_block(cfg.get("attention_head_dim", 8), n, "attention_head_dim", source)
        heads = tuple(h if h is not None else c for h, c in zip(heads, boc))
        for c, h in zip(boc, heads):
            if c % h:
                raise UnsupportedConfigError(f"{source}: block width {c} is not divisible by {h} attention heads.")
        groups = get("norm_num_groups")
        for c in boc:
            if c % groups:
                raise UnsupportedConfigError(f"{source}: block width {c} not divisible by norm_num_groups={groups}.")
        for k in ("conv_in_kernel", "conv_out_kernel"):
            if get(k) % 2 != 1:
                raise UnsupportedConfigError(f"{source}: `{k}` must be odd, got {get(k)}.")
        return cls(
            in_channels=get("in_channels"),
            out_channels=get("out_channels"),
            block_out_channels=boc,
            down_block_types=down,
            up_block_types=up,
            mid_block_type=mid,
            layers_per_block=_per_block(get("layers_per_block"), n, "layers_per_block", source),
            transformer_layers_per_block=tlpb,
            reverse_transformer_layers_per_block=rev,
            num_attention_heads=heads,
            cross_attention_dim=_per_block(cfg.get("cross_attention_dim", 1280), n, "cross_attention_dim", source),
            norm_num_groups=groups,
            norm_eps=float(get("norm_eps")),
            flip_sin_to_cos=bool(get("flip_sin_to_cos")),
            freq_shift=get("freq_shift"),
            time_embedding_dim=cfg.get("time_embedding_dim"),
            use_linear_projection=bool(get("use_linear_projection")),
            upcast_attention=bool(get("upcast_attention")),
            downsample_padding=get("downsample_padding"),
            mid_block_scale_factor=float(get("mid_block_scale_factor")),
            resnet_out_scale_factor=float(get("resnet_out_scale_factor")),
            center_input_sample=bool(get("center_input_sample")),
            conv_in_kernel=get("conv_in_kernel"),
            conv_out_kernel=get("conv_out_kernel"),
            addition_embed_type=cfg.get("addition_embed_type"),
            addition_time_embed_dim=cfg.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim"),
            sample_size=cfg.get("sample_size"),
            dropout=float(cfg.get("dropout") or 0.0),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """A diffusers `config.json` dict for this network."""
        return {
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "addition_embed_type": self.addition_embed_type,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "attention_head_dim": list(self.num_attention_heads),
            "block_out_channels": list(self.block_out_channels),
            "center_input_sample": self.center_input_sample,
            "conv_in_kernel": self.conv_in_kernel,
            "conv_out_kernel": self.conv_out_kernel,
            "cross_attention_dim": list(self.cross_attention_dim),
            "down_block_types": list(self.down_block_types),
            "downsample_padding": self.downsample_padding,
            "dropout": self.dropout,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "in_channels": self.in_channels,
            "layers_per_block": list(self.layers_per_block),
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "mid_block_type": self.mid_block_type,
            "norm_eps": self.norm_eps,
            "norm_num_groups": self.norm_num_groups,
            "out_channels": self.out_channels,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            "resnet_out_scale_factor": self.resnet_out_scale_factor,
            "reverse_transformer_layers_per_block": list(self.reverse_transformer_layers_per_block),
            "sample_size": self.sample_size,
            "time_embedding_dim": self.time_embedding_dim,
            "transformer_layers_per_block": list(self.transformer_layers_per_block),
            "up_block_types": list(self.up_block_types),
            "upcast_attention": self.upcast_attention,
            "use_linear_projection": self.use_linear_projection,
        }
