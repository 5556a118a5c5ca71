"""Parity of the Flax CLIP text encoders with transformers' PyTorch `CLIPTextModel` and
`CLIPTextModelWithProjection` (tiny, random, saved in the real transformers format), and loader errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from d2g_jax.models.clip_text import UnsupportedConfigError, load_clip_text
from d2g_jax.models.weights import WeightsError, read_safetensors, write_safetensors

# fp32: max abs error relative to the output's max magnitude (measured ≈ 1e-6).
REL_TOL = 1e-5
# bf16 compute (params stored fp32): a smoke bound, bf16 has an 8-bit mantissa.
BF16_REL_TOL = 5e-2

VOCAB, BOS, EOS, PAD = 1000, 998, 999, 1
TINY = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
    max_position_embeddings=77, projection_dim=24, bos_token_id=BOS, pad_token_id=PAD,
)  # fmt: skip


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """transformers initialises LayerNorms to (1, 0); perturb every parameter so layout and norm mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _build(tmp_path_factory, name, cls, seed, **cfg):
    torch.manual_seed(seed)
    model = cls(transformers.CLIPTextConfig(**{**TINY, **cfg})).eval()
    _randomize(model, seed)
    folder = str(tmp_path_factory.mktemp(name) / "text_encoder")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """SD-like: CLIPTextModel, quick_gelu, legacy eos_token_id=2 (pooled token = argmax of the ids)."""
    return _build(tmp_path_factory, "plain", transformers.CLIPTextModel, 0, hidden_act="quick_gelu", eos_token_id=2)


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    """SDXL-encoder-2-like: with projection, exact gelu, pooled token = first occurrence of eos_token_id."""
    return _build(
        tmp_path_factory, "proj", transformers.CLIPTextModelWithProjection, 1, hidden_act="gelu", eos_token_id=EOS
    )


def _ids(batch: int = 3, length: int = 77, seed: int = 0) -> np.ndarray:
    """BOS, random tokens, EOS, then padding: EOS-padded, `PAD`-padded and an unpadded (truncated) row."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB - 3, (batch, length))
    ids[:, 0] = BOS
    ids[0, 6:] = EOS  # pad = EOS (tokenizer 1 of SD/SDXL): pooled token is the first EOS
    ids[1, 10] = EOS
    ids[1, 11:] = PAD  # pad = another token (SDXL tokenizer 2 pads with "!")
    ids[2, -1] = EOS  # full length, no padding
    return ids


def _torch(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(torch.from_numpy(ids), output_hidden_states=True, **kw)


def _assert_close(ours, ref, tol=REL_TOL, what=""):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol} × scale {scale:.3g}"


@pytest.mark.parametrize("fixture", ["plain", "proj"])
def test_parity(request, fixture):
    model, folder = request.getfixturevalue(fixture)
    module, params = load_clip_text(folder)
    assert module.config.with_projection == (fixture == "proj")
    ids = _ids()
    out = jax.jit(module.apply)(params, jnp.asarray(ids))
    ref = _torch(model, ids)
    _assert_close(out.last_hidden_state, ref.last_hidden_state, what="last_hidden_state")
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for i, (a, b) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        _assert_close(a, b, what=f"hidden_states[{i}]")  # [-2] is SDXL's penultimate context
    if fixture == "proj":
        _assert_close(out.text_embeds, ref.text_embeds, what="text_embeds")
        with torch.no_grad():
            pooled_ref = model.text_model(torch.from_numpy(ids)).pooler_output
    else:
        assert out.text_embeds is None
        pooled_ref = ref.pooler_output
    _assert_close(out.pooler_output, pooled_ref, what="pooler_output")


def test_pooling_picks_the_eos_token(plain, proj):
    """Legacy configs (eos_token_id=2) pool at argmax(ids); new ones at the first EOS (padding may be EOS)."""
    ids = _ids(batch=4)
    ids[3] = np.random.default_rng(5).integers(3, 900, 77)  # no EOS at all, largest id at position 4
    ids[3, 4] = 950
    for (model, folder), want in ((plain, [6, 10, 76, 4]), (proj, [6, 10, 76, 0])):
        module, params = load_clip_text(folder)
        out = jax.jit(module.apply)(params, jnp.asarray(ids))
        for row, pos in enumerate(want):
            np.testing.assert_array_equal(out.pooler_output[row], out.last_hidden_state[row, pos])
        with torch.no_grad():
            text_model = getattr(model, "text_model", model)
            _assert_close(out.pooler_output, text_model(torch.from_numpy(ids)).pooler_output, what="pooled")


def test_attention_mask_and_short_sequences(proj):
    model, folder = proj
    module, params = load_clip_text(folder)
    ids = _ids(length=16, seed=3)
    ids[0, 6:] = PAD
    mask = np.ones_like(ids)
    mask[0, 7:] = 0
    mask[1, 11:] = 0
    out = jax.jit(module.apply)(params, jnp.asarray(ids), jnp.asarray(mask))
    ref = _torch(model, ids, mask)
    _assert_close(out.last_hidden_state, ref.last_hidden_state, what="masked last_hidden_state")
    _assert_close(out.text_embeds, ref.text_embeds, what="masked text_embeds")


def test_bf16_compute(proj):
    model, folder = proj
    module, params = load_clip_text(folder, dtype=jnp.bfloat16)
    ids = _ids()
    out = jax.jit(module.apply)(params, jnp.asarray(ids))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert jax.tree.leaves(params)[0].dtype == np.float32
    ref = _torch(model, ids)
    _assert_close(out.hidden_states[-2], ref.hidden_states[-2], BF16_REL_TOL, "bf16 penultimate")
    _assert_close(out.text_embeds, ref.text_embeds, BF16_REL_TOL, "bf16 text_embeds")
    _, p16 = load_clip_text(folder, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}


def test_legacy_prefixed_checkpoint(plain, tmp_path):
    """SD/SDXL checkpoints on the Hub store `text_model.*` names and the `position_ids` buffer."""
    model, folder = plain
    legacy = tmp_path / "text_encoder"
    shutil.copytree(folder, legacy)
    tensors = {f"text_model.{k}": np.array(v) for k, v in read_safetensors(f"{folder}/model.safetensors").items()}
    tensors["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    write_safetensors(str(legacy / "model.safetensors"), tensors)
    module, params = load_clip_text(str(legacy))
    ids = _ids()
    out = jax.jit(module.apply)(params, jnp.asarray(ids))
    _assert_close(out.last_hidden_state, _torch(model, ids).last_hidden_state)


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the file and the field/tensor.


def _copy(folder, tmp_path, config_update=None, drop=None, add=None):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    if config_update:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_update)
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop or add:
        tensors = {k: np.array(v) for k, v in read_safetensors(str(dst / "model.safetensors")).items() if k != drop}
        tensors.update(add or {})
        write_safetensors(str(dst / "model.safetensors"), tensors)
    return str(dst)


def test_unsupported_activation(plain, tmp_path):
    folder = _copy(plain[1], tmp_path, {"hidden_act": "gelu_new"})
    with pytest.raises(UnsupportedConfigError, match=r"config\.json: `hidden_act` = 'gelu_new'"):
        load_clip_text(folder)


def test_full_clip_config_rejected(plain, tmp_path):
    folder = _copy(plain[1], tmp_path, {"model_type": "clip"})
    with pytest.raises(UnsupportedConfigError, match="full CLIP"):
        load_clip_text(folder)


def test_missing_and_unexpected_tensors(proj, tmp_path):
    name = "text_model.encoder.layers.1.mlp.fc2.weight"
    folder = _copy(proj[1], tmp_path, drop=name, add={"text_model.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError) as e:
        load_clip_text(folder)
    msg = str(e.value)
    assert folder in msg and f"missing tensors (1): {name}" in msg and "unexpected tensors (1): text_model.extra" in msg


def test_projection_mismatch_and_shape_mismatch(plain, proj, tmp_path):
    with pytest.raises(WeightsError, match=r"missing tensors \(1\): text_projection\.weight"):
        load_clip_text(plain[1], with_projection=True)
    folder = _copy(proj[1], tmp_path, {"intermediate_size": 40})
    with pytest.raises(WeightsError, match=r"shape mismatches .*fc1\.weight"):
        load_clip_text(folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(WeightsError, match="not a folder"):
        load_clip_text(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(WeightsError, match="no config.json"):
        load_clip_text(str(tmp_path / "empty"))
