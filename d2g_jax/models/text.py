"""Prompt → U-Net conditioning, exactly as the diffusers SD and SDXL pipelines' `encode_prompt` compute it.

`TextEncoder.from_pipeline(folder)` reads a diffusers pipeline folder (`model_index.json`, `tokenizer[_2]/`,
`text_encoder[_2]/`) and gives
* SD1.x/2.x (one encoder): `context` = last hidden state after the final LayerNorm, `[B, 77, D]` (768 for SD1.5);
* SDXL (two encoders, or only `text_encoder_2` for the refiner): `context` = concat of each encoder's
  penultimate hidden state `[B, 77, D1 + D2]` (2048) and `pooled` = the projected EOS state of the last encoder
  `[B, P]` (1280);
* `encode_negative(batch)`: the unconditional (CFG) embeddings of the empty prompt "", or zeros for SDXL
  pipelines with `force_zeros_for_empty_prompt` (the default of `StableDiffusionXLPipeline`), as diffusers does.

Tokenisation (host side, transformers `CLIPTokenizer`): pad to `model_max_length` (77) and truncate, as the
pipelines do. The encoders run in one jitted pure function `embed(params, ids)`, usable inside a train step.
`clip_skip` follows diffusers too, including its quirk that negative prompts ignore it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from d2g_jax.models.clip_text import CLIPTextModel, UnsupportedConfigError, load_clip_text
from d2g_jax.models.weights import WeightsError, read_config

Dtype = Any

_ENCODER_CLASSES = {"CLIPTextModel": False, "CLIPTextModelWithProjection": True}
_TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")


class Tokens(NamedTuple):
    """Tokenizer output per encoder: ids and padding masks (1 = token), each `[B, T]` int32."""

    ids: tuple[np.ndarray, ...]
    masks: tuple[np.ndarray, ...]


def _component(index: dict[str, Any], name: str, source: str) -> str | None:
    """The class name of a pipeline component in model_index.json, or None when absent/null."""
    entry = index.get(name)
    if entry is None or (isinstance(entry, (list, tuple)) and (len(entry) != 2 or entry[1] is None)):
        return None
    if not isinstance(entry, (list, tuple)):
        raise WeightsError(f"{source}: `{name}` should be [library, class], got {entry!r}.")
    return entry[1]


def _load_tokenizer(folder: str):
    from transformers import CLIPTokenizer  # host-side only; transformers 5 reads vocab.json/merges.txt here

    if not os.path.isdir(folder):
        raise WeightsError(f"{folder}: tokenizer folder missing (listed in model_index.json).")
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise WeightsError(f"{folder}: cannot load a CLIPTokenizer ({e}); expected vocab.json + merges.txt.") from e


class TextEncoder:
    """The frozen prompt encoders of an SD/SDXL pipeline with their tokenizers.

    Attributes:
      modules, params: one `CLIPTextModel` and its `{"params": ...}` per encoder, in pipeline order.
      tokenizers: the matching transformers `CLIPTokenizer`s; `max_lengths` their padded lengths (T).
      sdxl: SDXL conditioning (penultimate states concatenated + pooled) instead of SD's last state.
      force_zeros_for_empty_prompt: unconditional embeddings are zeros (SDXL pipelines' flag).
      clip_skip: diffusers' `clip_skip` (None = the pipeline default layer).
    """

    def __init__(
        self,
        tokenizers: Sequence[Any],
        modules: Sequence[CLIPTextModel],
        params: Sequence[dict[str, Any]],
        *,
        sdxl: bool,
        force_zeros_for_empty_prompt: bool = False,
        clip_skip: int | None = None,
    ):
        if not modules or len(tokenizers) != len(modules) or len(params) != len(modules):
            raise ValueError("TextEncoder needs one tokenizer and one params tree per text encoder (at least one).")
        if not sdxl and len(modules) != 1:
            raise ValueError("SD-style conditioning uses exactly one text encoder.")
        if sdxl and not any(m.config.with_projection for m in modules):
            raise UnsupportedConfigError(
                "SDXL conditioning needs a CLIPTextModelWithProjection text encoder (its pooled output)."
            )
        n_layers = min(m.config.num_hidden_layers for m in modules)
        if clip_skip is not None and not 0 <= clip_skip <= n_layers - (1 if sdxl else 0):
            raise ValueError(f"clip_skip {clip_skip} out of range for {n_layers}-layer text encoders.")
        self.tokenizers = tuple(tokenizers)
        self.modules = tuple(modules)
        self.params = jax.device_put(tuple(params))  # once, not on every jitted call
        self.sdxl = sdxl
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.clip_skip = clip_skip
        self.max_lengths = tuple(
            min(int(tok.model_max_length), m.config.max_position_embeddings) for tok, m in zip(tokenizers, modules)
        )
        self._embed = jax.jit(self.embed, static_argnames=("negative",))
        self._empty: dict[str, jax.Array] | None = None
        # transformers' tokenizers are not thread-safe (the fast one re-sets padding/truncation on its shared Rust
        # object per call): every use from several threads (the demo server's workers and handlers) takes this lock
        self.tokenize_lock = threading.RLock()

    @classmethod
    def from_pipeline(
        cls,
        folder: str,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        clip_skip: int | None = None,
        variant: str | None = None,
    ) -> TextEncoder:
        """Loads tokenizers and text encoders of a diffusers pipeline folder, following its model_index.json."""
        source = os.path.join(folder, "model_index.json")
        index = read_config(folder, "model_index.json")
        names = []
        for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            enc_cls, tok_cls = _component(index, enc, source), _component(index, tok, source)
            if (enc_cls is None) != (tok_cls is None):
                raise WeightsError(f"{source}: `{enc}` and `{tok}` must be both present or both null.")
            if enc_cls is None:
                continue
            if enc_cls not in _ENCODER_CLASSES:
                raise UnsupportedConfigError(
                    f"{source}: `{enc}` class {enc_cls!r} is not supported (supported: {list(_ENCODER_CLASSES)})."
                )
            if tok_cls not in _TOKENIZER_CLASSES:
                raise UnsupportedConfigError(
                    f"{source}: `{tok}` class {tok_cls!r} is not supported (supported: {list(_TOKENIZER_CLASSES)})."
                )
            names.append((enc, tok, _ENCODER_CLASSES[enc_cls]))
        if not names:
            raise WeightsError(f"{source}: the pipeline lists no text encoder.")
        sdxl = any(enc == "text_encoder_2" for enc, _, _ in names)
        tokenizers, modules, params = [], [], []
        for enc, tok, proj in names:
            module, p = load_clip_text(
                os.path.join(folder, enc), dtype=dtype, param_dtype=param_dtype, with_projection=proj, variant=variant
            )
            tokenizers.append(_load_tokenizer(os.path.join(folder, tok)))
            modules.append(module)
            params.append(p)
        # StableDiffusionXL*Pipeline.__init__ defaults the flag to True; SD pipelines do not have it.
        force_zeros = bool(index.get("force_zeros_for_empty_prompt", True)) if sdxl else False
        return cls(
            tokenizers, modules, params, sdxl=sdxl, force_zeros_for_empty_prompt=force_zeros, clip_skip=clip_skip
        )

    # ------------------------------------------------------------------------------------------------------

    @property
    def context_dim(self) -> int:
        """D of `context: [B, T, D]` (768 SD1.5, 1024 SD2, 2048 SDXL)."""
        return sum(m.config.hidden_size for m in self.modules)

    @property
    def pooled_dim(self) -> int | None:
        """P of SDXL's `pooled: [B, P]` (1280), None for SD."""
        if not self.sdxl:
            return None
        return next(m.config.projection_dim for m in self.modules if m.config.with_projection)

    def tokenize(self, prompts: Sequence[str], prompts_2: Sequence[str] | None = None) -> Tokens:
        """Token ids and padding masks per encoder, each `[B, T]` int32, padded and truncated like diffusers.

        `prompts_2` goes to the second SDXL encoder (default: `prompts`, diffusers' `prompt_2 or prompt`).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prompts_2 = [prompts_2] if isinstance(prompts_2, str) else (list(prompts_2) if prompts_2 else prompts)
        if len(prompts_2) != len(prompts):
            raise ValueError(f"prompts_2 has {len(prompts_2)} entries for {len(prompts)} prompts.")
        # diffusers zips [prompt, prompt_2] with the tokenizers: a lone text_encoder_2 (refiner) gets `prompt`.
        ids, masks = [], []
        for tok, n, p in zip(self.tokenizers, self.max_lengths, (prompts, prompts_2)):
            with self.tokenize_lock:
                t = tok(p, padding="max_length", max_length=n, truncation=True, return_tensors="np")
            ids.append(t.input_ids.astype(np.int32))
            masks.append(t.attention_mask.astype(np.int32))
        return Tokens(tuple(ids), tuple(masks))

    def embed(
        self,
        params: Sequence[dict[str, Any]],
        ids: Sequence[jax.Array],
        masks: Sequence[jax.Array] | None = None,
        negative: bool = False,
    ) -> dict[str, jax.Array]:
        """Pure: ids (and padding masks) per encoder, `[B, T]` each → `{"context": [B, T, D], "pooled": [B, P]}`.

        float32 outputs; `pooled` only for SDXL. The masks matter only for SD encoders whose config sets
        `use_attention_mask` (SDXL pipelines never pass them). `negative=True` reproduces diffusers' negative
        branch, which ignores clip_skip.
        """
        skip = None if negative else self.clip_skip
        masks = masks if masks is not None else (None,) * len(ids)
        contexts, pooled = [], None
        for module, p, i, mask in zip(self.modules, params, ids, masks):
            use_mask = module.config.use_attention_mask and not self.sdxl and mask is not None
            out = module.apply(p, i, mask if use_mask else None)
            if self.sdxl:
                contexts.append(out.hidden_states[-(2 + (skip or 0))])
                if pooled is None and out.text_embeds is not None:  # diffusers: the first projected output
                    pooled = out.text_embeds
            elif skip is None:
                contexts.append(out.last_hidden_state)
            else:
                contexts.append(module.apply(p, out.hidden_states[-(skip + 1)], method=module.final_norm))
        result = {"context": jnp.concatenate(contexts, axis=-1).astype(jnp.float32)}
        if self.sdxl:
            result["pooled"] = pooled.astype(jnp.float32)
        return result

    def _run(self, tokens: Tokens, negative: bool = False) -> dict[str, jax.Array]:
        return self._embed(self.params, tokens.ids, tokens.masks, negative=negative)

    def encode(self, prompts: Sequence[str], prompts_2: Sequence[str] | None = None) -> dict[str, jax.Array]:
        """Prompts (B strings) → `{"context": [B, T, D], "pooled": [B, P] (SDXL only)}`, float32."""
        return self._run(self.tokenize(prompts, prompts_2))

    def encode_negative(
        self,
        batch: int,
        negative_prompts: Sequence[str] | None = None,
        negative_prompts_2: Sequence[str] | None = None,
    ) -> dict[str, jax.Array]:
        """Unconditional embeddings for CFG, `batch` rows, as diffusers builds `negative_prompt_embeds`.

        Without `negative_prompts`: zeros when `force_zeros_for_empty_prompt` (SDXL), else the embedding of ""
        (with `negative_prompts_2`, if given, for SDXL's second encoder, as diffusers does).
        """
        if negative_prompts is None:
            if self.force_zeros_for_empty_prompt:
                out = {"context": jnp.zeros((batch, self.max_lengths[0], self.context_dim), jnp.float32)}
                if self.sdxl:
                    out["pooled"] = jnp.zeros((batch, self.pooled_dim), jnp.float32)
                return out
            if negative_prompts_2 is None:
                if self._empty is None:  # one row, computed once and broadcast
                    self._empty = self._run(self.tokenize([""]), negative=True)
                return {k: jnp.broadcast_to(v, (batch, *v.shape[1:])) for k, v in self._empty.items()}
            negative_prompts = ""
        negative_prompts = [negative_prompts] * batch if isinstance(negative_prompts, str) else negative_prompts
        if len(negative_prompts) != batch:
            raise ValueError(f"{len(negative_prompts)} negative prompts for a batch of {batch}.")
        if isinstance(negative_prompts_2, str):
            negative_prompts_2 = [negative_prompts_2] * batch
        return self._run(self.tokenize(negative_prompts, negative_prompts_2), negative=True)
