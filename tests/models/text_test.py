"""`TextEncoder.from_pipeline` against diffusers' own `encode_prompt` on tiny SD- and SDXL-like pipeline folders
(hand-written CLIP BPE tokenizers + tiny random CLIP text encoders, no U-Net), and its error paths."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from tokenizers import pre_tokenizers

from d2g_jax.models.clip_text import UnsupportedConfigError
from d2g_jax.models.text import TextEncoder
from d2g_jax.models.weights import WeightsError

REL_TOL = 1e-5  # fp32: max abs error relative to the output's max magnitude

PROMPTS = ["a photo of a cat", "A dog on the moon, 4k!", "cat " * 100]  # the last one is truncated to 77
PROMPTS_2 = ["photo of a dog", "", "the moon"]
NEGATIVE = ["blurry photo", "", "ugly cat"]
MERGES = [
    ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>"),
    ("o", "f</w>"), ("t", "h"), ("th", "e</w>"), ("m", "o"), ("mo", "o"), ("moo", "n</w>"),
]  # fmt: skip
EOS_ID = 2 * 256 + len(MERGES) + 1  # vocab: 256 byte symbols, their "</w>" forms, merges, BOS, EOS


def _write_tokenizer(folder, pad_token: str) -> None:
    """A real-format CLIP BPE tokenizer folder (vocab.json, merges.txt, configs) over the 256 byte symbols.

    As in CLIP, `<|startoftext|>` and `<|endoftext|>` take the two largest ids. SDXL's tokenizer_2 pads with "!".
    """
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in MERGES] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    eot = "<|endoftext|>"
    special = dict(bos_token="<|startoftext|>", eos_token=eot, unk_token=eot, pad_token=pad_token)
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(dict(special, model_max_length=77, tokenizer_class="CLIPTokenizer"))
    )


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _encoder(cls, seed, **cfg):
    torch.manual_seed(seed)
    base = dict(vocab_size=600, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, projection_dim=24, bos_token_id=0, pad_token_id=1)  # fmt: skip
    model = cls(transformers.CLIPTextConfig(**{**base, **cfg})).eval()
    _randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    _write_tokenizer(root / "tok1", "<|endoftext|>")
    _write_tokenizer(root / "tok2", "!")
    tok1 = transformers.CLIPTokenizer.from_pretrained(str(root / "tok1"))
    tok2 = transformers.CLIPTokenizer.from_pretrained(str(root / "tok2"))
    assert tok1.eos_token_id == EOS_ID and tok2.pad_token_id == 0
    # SD checkpoints' legacy eos_token_id=2 (pool at argmax id); encoder 2 uses the new first-EOS rule.
    te1 = _encoder(transformers.CLIPTextModel, 0, hidden_size=32, hidden_act="quick_gelu", eos_token_id=2)
    te2 = _encoder(transformers.CLIPTextModelWithProjection, 1, hidden_size=40, hidden_act="gelu", eos_token_id=EOS_ID)
    te_mask = _encoder(transformers.CLIPTextModel, 2, hidden_size=32, hidden_act="quick_gelu", eos_token_id=2)
    te_mask.config.use_attention_mask = True  # diffusers then passes the tokenizer's padding mask
    return dict(root=root, tok1=tok1, tok2=tok2, te1=te1, te2=te2, te_mask=te_mask)


def _save(pipe, folder, parts, tokenizers):
    pipe.save_pretrained(str(folder))
    for sub, tok in tokenizers.items():  # keep the Hub layout (vocab.json + merges.txt) for the tokenizers
        shutil.rmtree(folder / sub)
        shutil.copytree(parts["root"] / tok, folder / sub)
    return str(folder)


def _sd(parts, folder, te):
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=parts[te], tokenizer=parts["tok1"], unet=None, scheduler=None, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    return pipe, _save(pipe, folder, parts, {"tokenizer": "tok1"})


def _sdxl(parts, folder, force_zeros):
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=parts["te1"], text_encoder_2=parts["te2"], tokenizer=parts["tok1"],
        tokenizer_2=parts["tok2"], unet=None, scheduler=None, force_zeros_for_empty_prompt=force_zeros,
    )  # fmt: skip
    return pipe, _save(pipe, folder, parts, {"tokenizer": "tok1", "tokenizer_2": "tok2"})


@pytest.fixture(scope="module")
def sd(parts, tmp_path_factory):
    return _sd(parts, tmp_path_factory.mktemp("sd") / "pipe", "te1")


@pytest.fixture(scope="module")
def sdxl(parts, tmp_path_factory):
    return _sdxl(parts, tmp_path_factory.mktemp("sdxl") / "pipe", True)


def _assert_close(ours, ref, what=""):
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
    assert err <= REL_TOL * scale, f"{what}: max abs err {err:.3g} > {REL_TOL} × scale {scale:.3g}"


def _sd_ref(pipe, **kw):
    with torch.no_grad():
        return pipe.encode_prompt(PROMPTS, "cpu", 1, True, **kw)


def test_sd_matches_pipeline(sd):
    pipe, folder = sd
    te = TextEncoder.from_pipeline(folder)
    assert not te.sdxl and te.context_dim == 32 and te.pooled_dim is None and te.max_lengths == (77,)
    cond, uncond = _sd_ref(pipe)
    out = te.encode(PROMPTS)
    assert set(out) == {"context"} and out["context"].shape == (3, 77, 32)
    _assert_close(out["context"], cond, "SD prompt_embeds")
    _assert_close(te.encode_negative(3)["context"], uncond, "SD negative of ''")
    _, uncond_neg = _sd_ref(pipe, negative_prompt=NEGATIVE)
    _assert_close(te.encode_negative(3, NEGATIVE)["context"], uncond_neg, "SD negative_prompt")


def test_sd_clip_skip(sd):
    pipe, folder = sd
    te = TextEncoder.from_pipeline(folder, clip_skip=1)
    # diffusers 0.42's SD clip_skip branch reads `text_encoder.text_model.final_layer_norm`, which transformers 5's
    # CLIPTextModel no longer has; the reference is that branch's formula, spelled out.
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(1 + 1)]
        cond = pipe.text_encoder.final_layer_norm(hidden)
    _, uncond = _sd_ref(pipe)  # the negative branch ignores clip_skip
    _assert_close(te.encode(PROMPTS)["context"], cond, "SD clip_skip=1")
    _assert_close(te.encode_negative(3)["context"], uncond, "SD clip_skip=1 negative (diffusers ignores the skip)")


def test_sd_use_attention_mask(parts, tmp_path):
    pipe, folder = _sd(parts, tmp_path / "pipe", "te_mask")
    te = TextEncoder.from_pipeline(folder)
    assert te.modules[0].config.use_attention_mask
    cond, uncond = _sd_ref(pipe)
    _assert_close(te.encode(PROMPTS)["context"], cond, "SD masked prompt_embeds")
    _assert_close(te.encode_negative(3)["context"], uncond, "SD masked negative")


def _sdxl_ref(pipe, **kw):
    with torch.no_grad():
        return pipe.encode_prompt(PROMPTS, PROMPTS_2, device="cpu", num_images_per_prompt=1, **kw)


def test_sdxl_matches_pipeline(sdxl):
    pipe, folder = sdxl
    te = TextEncoder.from_pipeline(folder)
    assert te.sdxl and te.force_zeros_for_empty_prompt and te.context_dim == 72 and te.pooled_dim == 24
    cond, uncond, pooled, uncond_pooled = _sdxl_ref(pipe, do_classifier_free_guidance=True)
    out = te.encode(PROMPTS, PROMPTS_2)
    assert out["context"].shape == (3, 77, 72) and out["pooled"].shape == (3, 24)
    _assert_close(out["context"], cond, "SDXL prompt_embeds")
    _assert_close(out["pooled"], pooled, "SDXL pooled_prompt_embeds")
    neg = te.encode_negative(3)  # force_zeros_for_empty_prompt
    assert not torch.any(uncond) and not torch.any(uncond_pooled)
    np.testing.assert_array_equal(neg["context"], np.zeros((3, 77, 72)))
    np.testing.assert_array_equal(neg["pooled"], np.zeros((3, 24)))
    # prompt_2 defaults to prompt, as in diffusers.
    cond1, _, pooled1, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    out1 = te.encode(PROMPTS)
    _assert_close(out1["context"], cond1.detach(), "SDXL prompt_2=None")
    _assert_close(out1["pooled"], pooled1.detach(), "SDXL pooled prompt_2=None")


def test_sdxl_empty_prompt_negatives_and_clip_skip(parts, sdxl, tmp_path):
    pipe, folder = _sdxl(parts, tmp_path / "pipe", force_zeros=False)
    te = TextEncoder.from_pipeline(folder, clip_skip=1)
    assert not te.force_zeros_for_empty_prompt
    cond, uncond, pooled, uncond_pooled = _sdxl_ref(pipe, do_classifier_free_guidance=True, clip_skip=1)
    out = te.encode(PROMPTS, PROMPTS_2)
    _assert_close(out["context"], cond, "SDXL clip_skip=1 prompt_embeds")
    _assert_close(out["pooled"], pooled, "SDXL clip_skip=1 pooled")
    neg = te.encode_negative(3)
    _assert_close(neg["context"], uncond, "SDXL negative of ''")
    _assert_close(neg["pooled"], uncond_pooled, "SDXL negative pooled of ''")
    ref = _sdxl_ref(pipe, do_classifier_free_guidance=True, negative_prompt=NEGATIVE)
    neg = te.encode_negative(3, NEGATIVE)
    _assert_close(neg["context"], ref[1], "SDXL negative_prompt")
    _assert_close(neg["pooled"], ref[3], "SDXL negative pooled")
    ref = _sdxl_ref(pipe, do_classifier_free_guidance=True, negative_prompt_2=NEGATIVE)  # "" for encoder 1
    neg = te.encode_negative(3, negative_prompts_2=NEGATIVE)
    _assert_close(neg["context"], ref[1], "SDXL negative_prompt_2 only")
    _assert_close(neg["pooled"], ref[3], "SDXL negative pooled, negative_prompt_2 only")


def test_embed_is_pure_and_jittable(sdxl):
    """`embed` takes params and ids explicitly, so it can live inside a user's jitted step."""
    _, folder = sdxl
    te = TextEncoder.from_pipeline(folder)
    tokens = te.tokenize(PROMPTS[:2], PROMPTS_2[:2])
    assert [i.shape for i in tokens.ids] == [(2, 77), (2, 77)] and tokens.ids[0].dtype == np.int32
    assert tokens.ids[1][1, -1] == 0  # tokenizer_2 pads with "!" (id 0) as SDXL's does

    @jax.jit
    def step(params, ids):
        return jnp.mean(te.embed(params, ids)["context"], axis=1)

    np.testing.assert_allclose(step(te.params, tokens.ids), te.encode(PROMPTS[:2], PROMPTS_2[:2])["context"].mean(1),
                               rtol=1e-6, atol=1e-6)  # fmt: skip


def test_force_zeros_default_for_sdxl(sdxl, tmp_path):
    _, folder = sdxl
    copy = tmp_path / "pipe"
    shutil.copytree(folder, copy)
    index = json.loads((copy / "model_index.json").read_text())
    del index["force_zeros_for_empty_prompt"]  # StableDiffusionXLPipeline's __init__ default applies: True
    (copy / "model_index.json").write_text(json.dumps(index))
    assert TextEncoder.from_pipeline(str(copy)).force_zeros_for_empty_prompt


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the file and the field.


def test_errors(sd, tmp_path):
    _, folder = sd
    with pytest.raises(WeightsError, match="no model_index.json"):
        TextEncoder.from_pipeline(str(tmp_path))

    def variant(name, edit):
        dst = tmp_path / name
        shutil.copytree(folder, dst)
        edit(dst)
        return str(dst)

    def set_index(dst, **kw):
        index = json.loads((dst / "model_index.json").read_text())
        index.update(kw)
        (dst / "model_index.json").write_text(json.dumps(index))

    t5 = variant("t5", lambda d: set_index(d, text_encoder=["transformers", "T5EncoderModel"]))
    with pytest.raises(UnsupportedConfigError, match=r"model_index\.json: `text_encoder` class 'T5EncoderModel'"):
        TextEncoder.from_pipeline(t5)
    no_tok = variant("no_tok", lambda d: set_index(d, tokenizer=[None, None]))
    with pytest.raises(WeightsError, match="`text_encoder` and `tokenizer` must be both present"):
        TextEncoder.from_pipeline(no_tok)
    gone = variant("gone", lambda d: shutil.rmtree(d / "tokenizer"))
    with pytest.raises(WeightsError, match=r"tokenizer: tokenizer folder missing"):
        TextEncoder.from_pipeline(gone)

    def bad_act(d):
        cfg = json.loads((d / "text_encoder" / "config.json").read_text())
        (d / "text_encoder" / "config.json").write_text(json.dumps(dict(cfg, hidden_act="relu")))

    act = variant("act", bad_act)
    with pytest.raises(UnsupportedConfigError, match=r"text_encoder/config\.json: `hidden_act` = 'relu'"):
        TextEncoder.from_pipeline(act)
