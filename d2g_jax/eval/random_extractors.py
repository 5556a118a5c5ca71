"""Random-weight stand-ins for the evaluation feature extractors, written in the SAME on-disk formats as the real files.

For tests and tiny smoke runs only: numbers computed with these files mean nothing (NEVER report them). Each writer
produces exactly what the matching loader in `d2g_jax.eval.extractors` (and the upstream library it wraps) reads:

* `write_random_inception(path)`: a TorchScript ``inception-2015-12-05.pt`` with the interface clean-fid uses (a
  scripted module with a ``layers`` submodule mapping [N,3,299,299] → [N,2048,1,1] and
  ``forward(img, return_features: bool = False)``); random InceptionV3 trunk (torchvision layout), BatchNorm running
  statistics calibrated on one random batch so features are O(1). ~96 MB, ~3 s on 2 CPU cores.
* `write_random_clip(folder)`: a tiny transformers ``CLIPModel`` folder (config.json + model.safetensors), a REAL CLIP
  BPE tokenizer (vocab.json + merges.txt + tokenizer.json built from open_clip's bundled
  ``bpe_simple_vocab_16e6.txt.gz``: the same 49408-token vocabulary as OpenAI / LAION CLIP, <|startoftext|> = 49406,
  <|endoftext|> = 49407) and a preprocessor_config.json. ~12 MB (the 49408×32 token embedding dominates), ~1 s.
* `write_random_dreamsim(folder, dreamsim_type)`: the files ``dreamsim.model.download_weights`` checks for that type
  (``*_pretrain.pth.tar`` = {'state_dict': ViT weights in dreamsim's DINO layout + 'proj'}, ``dino_vitb16_pretrain.pth``
  = {'student': DINO head}) plus the LoRA adapter folder (``<tag>lora/`` as peft saves it: adapter_config.json +
  adapter_model.safetensors, random non-zero LoRA A and B); for types with a DINO branch ("ensemble", "dino_vitb16")
  also what torch.hub reads offline: ``facebookresearch_dino_main/`` (hubconf.py with DINO's ``dino_vitb16`` entry
  point + DINO's vision_transformer.py as vendored by dreamsim) and ``checkpoints/dino_vitbase16_pretrain.pth``.
  With ``compact=True`` (default) every large weight is a Hankel view (row i = pool[off+i : off+i+row_size]) into one
  shared 4 MiB random pool, which torch.save stores once: files of a few MiB instead of ~350 MB per ViT-B, loaded by
  the unchanged upstream loaders (torch.load + load_state_dict copy the views into ordinary parameters).

torch, torchvision, transformers, open_clip and dreamsim are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import shutil

__all__ = ["write_random_inception", "write_random_clip", "write_random_dreamsim", "DREAMSIM_RANDOM_TYPES"]

INCEPTION_FILENAME = "inception-2015-12-05.pt"
DREAMSIM_RANDOM_TYPES = ("open_clip_vitb32", "clip_vitb32", "dino_vitb16", "ensemble")
_DINO_WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"
_OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@contextlib.contextmanager
def _seeded(seed: int):
    """Seeds torch's global CPU RNG inside the block (module constructors draw from it) and restores it after."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ------------------------------------------------------------------------------------------------ Inception (FID)


_INCEPTION_TRUNK = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "avgpool",
)


def write_random_inception(path: str, seed: int = 0) -> str:
    """Writes a random-weight ``inception-2015-12-05.pt`` (TorchScript); `path` = a folder (created) or a ``.pt`` path.

    Same interface as NVIDIA's port that clean-fid loads: ``module.layers(x)`` maps (img − 128)/128, [N,3,299,299] to
    [N,2048,1,1] and ``module(img, return_features=True)`` (bilinear resize to 299 inside) gives [N,2048]; without
    return_features it returns 1008-way softmax "logits" like the original. Returns the file path.
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    from torchvision.models.inception import inception_v3

    path = os.fspath(path)
    file = path if path.endswith(".pt") else os.path.join(path, INCEPTION_FILENAME)
    os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)

    class _Layers(nn.Module):
        def __init__(self, net):
            super().__init__()
            for name in _INCEPTION_TRUNK:
                self.add_module(name, getattr(net, name))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for module in self.children():
                x = module(x)
            return x

    class _InceptionFID(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.layers = _Layers(net)
            self.output = nn.Linear(2048, 1008)

        def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            x = img.to(torch.float32)
            if x.shape[2] != 299 or x.shape[3] != 299:
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = (x - 128.0) / 128.0
            features = self.layers(x).reshape(-1, 2048)
            if return_features:
                return features
            return F.softmax(self.output(features), dim=1)

    with _seeded(seed), torch.no_grad():
        net = inception_v3(weights=None, aux_logits=False, init_weights=False)
        module = _InceptionFID(net)
        # Calibrate BatchNorm on one small random batch (train-mode pass, cumulative average) so every layer is
        # normalised and the 2048-d features are O(1) instead of vanishing through ~95 random layers.
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        module.train()
        module.layers(torch.rand(2, 3, 160, 160) * 2.0 - 1.0)
        module.eval()
        with _warnings_silenced():
            scripted = torch.jit.script(module)
            scripted.save(file)
    return file


@contextlib.contextmanager
def _warnings_silenced():
    """torch.jit.script/load emit a deprecation warning per submodule in torch ≥ 2.10; the format is what we need."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)
        yield


# ------------------------------------------------------------------------------------------------------------ CLIP


def _clip_bpe_files() -> tuple[dict, list[str]]:
    """CLIP's real BPE vocabulary (as in openai/CLIP and every HF CLIP folder) from open_clip's bundled merges file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write_random_clip(
    folder: str,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 32,
    layers: int = 2,
    projection_dim: int = 16,
) -> str:
    """Writes a tiny random transformers ``CLIPModel`` folder with a real CLIP tokenizer; returns `folder`.

    Files: config.json, model.safetensors (``save_pretrained``), vocab.json, merges.txt, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, preprocessor_config.json (OpenAI mean/std, shortest edge and
    center crop = image_size, bicubic) — the layout of e.g. laion/CLIP-ViT-g-14-laion2B-s12B-b42K.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    heads = max(1, width // 16)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
            hidden_act="gelu",
        ),
        projection_dim=projection_dim,
    )
    with _seeded(seed):
        model = CLIPModel(config).eval()
        with torch.no_grad():  # HF's CLIP init leaves biases at zero and LayerNorms at identity: perturb everything
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)

    vocab, merges = _clip_bpe_files()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}, f, indent=2
        )
    tokenizer = CLIPTokenizer.from_pretrained(folder)  # adds tokenizer.json (the fast/`tokenizers` serialisation)
    tokenizer.save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": image_size},
                "resample": 3,
                "do_center_crop": True,
                "crop_size": {"height": image_size, "width": image_size},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": _OPENAI_CLIP_MEAN,
                "image_std": _OPENAI_CLIP_STD,
                "do_convert_rgb": True,
            },
            f,
            indent=2,
        )
    return folder


# -------------------------------------------------------------------------------------------------------- DreamSim


class _RandomTensors:
    """Random tensors; with `compact`, large ones are Hankel views into one shared pool (saved once by torch.save)."""

    POOL = 1 << 20  # 4 MiB of float32
    MIN_VIEW = 1 << 15  # tensors smaller than this are stored as ordinary contiguous tensors

    def __init__(self, seed: int, compact: bool):
        import torch

        self.torch = torch
        self.gen = torch.Generator().manual_seed(seed)
        self.compact = compact
        self.pool = torch.randn(self.POOL, generator=self.gen) * 0.02 if compact else None

    def normal(self, shape, std: float = 0.02):
        torch = self.torch
        numel = math.prod(shape)
        if self.compact and numel >= self.MIN_VIEW and std == 0.02:
            row = numel // shape[0]
            span = shape[0] + row - 1
            assert span <= self.POOL, (shape, span)
            offset = int(torch.randint(0, self.POOL - span + 1, (1,), generator=self.gen))
            strides, acc = [], 1
            for d in reversed(shape[1:]):
                strides.insert(0, acc)
                acc *= d
            return self.pool.as_strided(tuple(shape), (1, *strides), offset)
        return torch.randn(tuple(shape), generator=self.gen) * std

    def ones_ish(self, shape):
        return 1.0 + self.torch.randn(tuple(shape), generator=self.gen) * 0.02


def _random_vit_state(rt: _RandomTensors, patch_size: int, pos_drop_layernorm: bool) -> dict:
    """A random state dict for dreamsim's vendored DINO ``vit_base(patch_size)`` (num_classes=0, no head)."""
    width, depth, tokens = 768, 12, (224 // patch_size) ** 2 + 1
    sd = {
        "cls_token": rt.normal((1, 1, width)),
        "pos_embed": rt.normal((1, tokens, width)),
        "patch_embed.proj.weight": rt.normal((width, 3, patch_size, patch_size)),
        "patch_embed.proj.bias": rt.normal((width,)),
    }
    if pos_drop_layernorm:  # dreamsim's CLIP→DINO conversion turns pos_drop into CLIP's ln_pre
        sd["pos_drop.weight"], sd["pos_drop.bias"] = rt.ones_ish((width,)), rt.normal((width,))
    for i in range(depth):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = rt.ones_ish((width,)), rt.normal((width,))
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = rt.normal((3 * width, width)), rt.normal((3 * width,))
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = rt.normal((width, width)), rt.normal((width,))
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = rt.ones_ish((width,)), rt.normal((width,))
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = rt.normal((4 * width, width)), rt.normal((4 * width,))
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = rt.normal((width, 4 * width)), rt.normal((width,))
    sd["norm.weight"], sd["norm.bias"] = rt.ones_ish((width,)), rt.normal((width,))
    return sd


_DINO_HUBCONF = (
    '''"""Stand-in for facebookresearch/dino's hubconf.py (random-weight folder written by d2g_jax): same
entry point, same weights URL (torch.hub finds the file in <hub_dir>/checkpoints/ and never downloads it)."""
import torch
import vision_transformer as vits

dependencies = ["torch", "torchvision"]


def dino_vitb16(pretrained=True, **kwargs):
    model = vits.__dict__["vit_base"](patch_size=16, num_classes=0, **kwargs)
    if pretrained:
        state_dict = torch.hub.load_state_dict_from_url(url="%s", map_location="cpu")
        model.load_state_dict(state_dict, strict=True)
    return model
'''
    % _DINO_WEIGHTS_URL
)


def _write_dino_hub(folder: str, rt: _RandomTensors) -> None:
    import torch
    from dreamsim.feature_extraction import vision_transformer

    repo = os.path.join(folder, "facebookresearch_dino_main")
    os.makedirs(repo, exist_ok=True)
    with open(os.path.join(repo, "hubconf.py"), "w") as f:
        f.write(_DINO_HUBCONF)
    shutil.copyfile(vision_transformer.__file__, os.path.join(repo, "vision_transformer.py"))
    os.makedirs(os.path.join(folder, "checkpoints"), exist_ok=True)
    torch.save(
        _random_vit_state(rt, 16, pos_drop_layernorm=False),
        os.path.join(folder, "checkpoints", os.path.basename(_DINO_WEIGHTS_URL)),
    )
    head = {
        "module.head.mlp.0.weight": rt.normal((2048, 768)),
        "module.head.mlp.0.bias": rt.normal((2048,)),
        "module.head.mlp.2.weight": rt.normal((2048, 2048)),
        "module.head.mlp.2.bias": rt.normal((2048,)),
        "module.head.mlp.4.weight": rt.normal((256, 2048)),
        "module.head.mlp.4.bias": rt.normal((256,)),
        "module.head.last_layer.weight": rt.normal((65536, 256)),
    }
    torch.save({"student": head}, os.path.join(folder, "dino_vitb16_pretrain.pth"))


def write_random_dreamsim(
    folder: str, dreamsim_type: str = "open_clip_vitb32", seed: int = 0, compact: bool = True
) -> str:
    """Writes a random-weight DreamSim cache_dir for `dreamsim_type` (one of DREAMSIM_RANDOM_TYPES); returns `folder`.

    ``dreamsim.dreamsim(pretrained=True, cache_dir=folder, dreamsim_type=...)`` then loads it without any download
    (types with a DINO branch go through torch.hub, which finds ``facebookresearch_dino_main`` and
    ``checkpoints/dino_vitbase16_pretrain.pth`` here). "open_clip_vitb32" is the lightest (one ViT-B/32, no torch.hub);
    "ensemble" builds three ViT-B/16 (≈ 3× the construction and ≈ 12× the forward cost of a ViT-B/32).
    """
    import torch
    from dreamsim.config import dreamsim_args
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    if dreamsim_type not in DREAMSIM_RANDOM_TYPES:
        raise ValueError(f"write_random_dreamsim supports {DREAMSIM_RANDOM_TYPES}, not {dreamsim_type!r}")
    os.makedirs(folder, exist_ok=True)
    rt = _RandomTensors(seed, compact)
    model_types = dreamsim_args["model_config"][dreamsim_type]["model_type"].split(",")
    for model_type in model_types:
        if model_type == "dino_vitb16":
            _write_dino_hub(folder, rt)
            continue
        patch = int(model_type[-2:])
        sd = _random_vit_state(rt, patch, pos_drop_layernorm=True)
        sd["proj"] = rt.normal((768, 512), std=768**-0.5)
        torch.save({"state_dict": sd}, os.path.join(folder, f"{model_type}_pretrain.pth.tar"))

    # The LoRA adapter, saved by peft from the model dreamsim itself builds on these files (so names and shapes match).
    tag = "ensemble_" if dreamsim_type == "ensemble" else f"{model_types[0]}_single_"
    previous_hub = torch.hub.get_dir()
    try:
        with _seeded(seed + 1):
            base = PerceptualModel(
                **dreamsim_args["model_config"][dreamsim_type], device="cpu", load_dir=folder, normalize_embeds=True
            )
            config = LoraConfig(r=16, lora_alpha=0.5, lora_dropout=0.3, bias="none", target_modules=["qkv"])
            peft_model = get_peft_model(base, config)
    finally:
        torch.hub.set_dir(previous_hub)  # dreamsim's DINO loader calls torch.hub.set_dir(folder)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # LoRA B starts at zero (a no-op adapter): make A and B random so the adapter matters
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(os.path.join(folder, f"{tag}lora"))
    return folder
