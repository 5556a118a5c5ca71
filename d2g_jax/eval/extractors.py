"""Evaluation feature extractors, loaded from LOCAL files in their real published formats (no downloads, ever).

These are the field's standard torch implementations, so the numbers are comparable with published ones (paper §4
"Evaluation protocols": GigaGAN's protocol, clean-fid, CLIP-score with OpenCLIP ViT-g-14, DreamSim):

* `InceptionExtractor`: clean-fid's FID Inception (NVIDIA's TorchScript port of the TF FID graph,
  ``inception-2015-12-05.pt``), run exactly as ``cleanfid.inception_torchscript.InceptionV3W`` in mode "clean".
* `ClipScorer`: a transformers ``CLIPModel`` folder, scored as GigaGAN's ``compute_clip_score`` does (open_clip
  preprocessing, "A photo depicts " inserted after the start token, cosine of the projected embeddings).
* `DreamSimEmbedder`: the ``dreamsim`` package on an unzipped official checkpoint folder.

torch / transformers / dreamsim are imported inside the classes, so ``import d2g_jax.eval.extractors`` needs none of
them. Everything runs in eval mode under ``torch.no_grad()``; device "auto" = cuda if available else cpu. Random-weight
files in the same formats (tests / smoke runs only) come from `d2g_jax.eval.random_extractors`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Sequence

import numpy as np

__all__ = [
    "InceptionExtractor",
    "ClipScorer",
    "DreamSimEmbedder",
    "INCEPTION_FILENAME",
    "INCEPTION_URL",
    "CLIP_PROMPT_PREFIX",
    "DREAMSIM_REQUIRED_FILES",
    "dreamsim_required_files",
    "file_fingerprint",
]

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"

CLIP_PROMPT_PREFIX = "A photo depicts "  # GigaGAN (after Hessel et al. 2021, arXiv:2104.08718)
CLIP_SOT_ID, CLIP_EOT_ID = 49406, 49407
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)

# Copy of the table inside dreamsim.model.download_weights (dreamsim 0.2.x): what it checks before downloading.
DREAMSIM_REQUIRED_FILES = {
    "ensemble": [
        "dino_vitb16_pretrain.pth",
        "open_clip_vitb16_pretrain.pth.tar",
        "clip_vitb16_pretrain.pth.tar",
        "ensemble_lora",
    ],
    "dino_vitb16": ["dino_vitb16_pretrain.pth", "dino_vitb16_single_lora"],
    "dinov2_vitb14": ["dinov2_vitb14_pretrain.pth", "dinov2_vitb14_single_lora"],
    "open_clip_vitb32": ["open_clip_vitb32_pretrain.pth.tar", "open_clip_vitb32_single_lora"],
    "clip_vitb32": ["clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora"],
    "synclr_vitb16": ["synclr_vit_b_16.pth", "synclr_vitb16_single_lora"],
}
# What torch.hub reads from the hub dir (= the DreamSim folder; dreamsim calls torch.hub.set_dir(cache_dir)) for the
# DINO branches; dreamsim's zips do not contain these: torch.hub downloads them there on the first online run.
_DREAMSIM_HUB_FILES = {
    "dino": [
        ("facebookresearch_dino_main/hubconf.py", "https://github.com/facebookresearch/dino (branch main)"),
        (
            "checkpoints/dino_vitbase16_pretrain.pth",
            "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        ),
    ],
    "dinov2": [
        ("facebookresearch_dinov2_main/hubconf.py", "https://github.com/facebookresearch/dinov2 (branch main)"),
        (
            "checkpoints/dinov2_vitb14_pretrain.pth",
            "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth",
        ),
    ],
}


# ----------------------------------------------------------------------------------------------------------- helpers


def file_fingerprint(path: str) -> str:
    """sha256 (hex, 16 chars) of a file's first and last MiB plus its size: cheap, content-based cache-key material."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 1 << 20:
            f.seek(max(size - (1 << 20), 1 << 20))
            h.update(f.read())
    return h.hexdigest()[:16]


def _tree_fingerprint(root: str, names: Sequence[str]) -> str:
    """Fingerprint of the given files/folders (relative to root; folders recursively, sorted)."""
    h = hashlib.sha256()
    for name in sorted(names):
        full = os.path.join(root, name)
        files = (
            [full]
            if os.path.isfile(full)
            else sorted(os.path.join(d, f) for d, _, fs in os.walk(full) for f in fs if not f.endswith((".pyc", ".md")))
        )
        for f in files:
            h.update(os.path.relpath(f, root).encode() + b"\0" + file_fingerprint(f).encode() + b"\0")
    return h.hexdigest()[:16]


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _uint8_images(images, name: str = "images") -> np.ndarray:
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name}: expected uint8 [N,H,W,3], got {x.dtype} {list(x.shape)}")
    return x


# --------------------------------------------------------------------------------------------------- FID Inception


def inception_file(path: str) -> str:
    """The Inception file for `path` (the file itself, or ``<folder>/inception-2015-12-05.pt``); raises if missing."""
    path = os.fspath(path) if path else ""
    if not path:
        raise FileNotFoundError(
            f"No FID Inception weights configured: set config.eval.inception to clean-fid's {INCEPTION_FILENAME} "
            f"(a file or its folder; download: {INCEPTION_URL})"
        )
    file = path if (os.path.isfile(path) or path.endswith(".pt")) else os.path.join(path, INCEPTION_FILENAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"FID Inception weights not found: {file} (config.eval.inception = {path!r}). Expected clean-fid's "
            f"TorchScript file {INCEPTION_FILENAME} (NVIDIA's port of the TF FID Inception), downloadable from "
            f"{INCEPTION_URL}; put it there or point config.eval.inception at the file or its folder."
        )
    return file


class InceptionExtractor:
    """clean-fid's FID Inception features ("clean" mode), from the local TorchScript ``inception-2015-12-05.pt``.

    Loads and runs it exactly as ``cleanfid.inception_torchscript.InceptionV3W(resize_inside=False)``:
    ``torch.jit.load(file).eval()``, its ``.layers`` on (x − 128)/128 in NCHW, features ``.view(bs, 2048)``.
    Inputs must already be 299×299 (clean-fid resizes with PIL bicubic before; see d2g_jax.eval.resize).
    """

    def __init__(self, path: str, device: str = "auto", batch_size: int = 64):
        import torch

        self.file = inception_file(path)
        self.device = _resolve_device(device)
        self.batch_size = int(batch_size)
        with warnings.catch_warnings():  # torch ≥ 2.10 flags torch.jit as deprecated; the file format is TorchScript
            warnings.simplefilter("ignore", category=FutureWarning)
            self._base = torch.jit.load(self.file, map_location="cpu").eval().to(self.device)
        self._layers = self._base.layers
        self.identity = f"inception-2015-12-05/{file_fingerprint(self.file)}"

    def __call__(self, images, batch_size: int | None = None) -> np.ndarray:
        """float32 [N,299,299,3] in [0,255] → float32 [N,2048]."""
        import torch

        x = np.asarray(images, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (299, 299, 3):
            raise ValueError(f"InceptionExtractor expects [N,299,299,3] in [0,255], got {list(x.shape)}")
        bs = int(batch_size or self.batch_size)
        out = np.zeros((x.shape[0], 2048), np.float32)
        with torch.no_grad():
            for s in range(0, x.shape[0], bs):
                xb = torch.from_numpy(np.ascontiguousarray(x[s : s + bs].transpose(0, 3, 1, 2))).to(self.device)
                x1 = xb - 128  # InceptionV3W.forward, resize_inside=False
                x2 = x1 / 128
                out[s : s + bs] = self._layers.forward(x2).view((xb.shape[0], 2048)).float().cpu().numpy()
        return out


# ------------------------------------------------------------------------------------------------------ CLIP score


def check_clip_folder(path: str) -> str:
    """Raises FileNotFoundError naming what a transformers CLIPModel folder lacks; returns the folder."""
    path = os.fspath(path) if path else ""
    fix = (
        "set config.eval.clip to a transformers CLIPModel folder (config.json, model.safetensors or "
        "pytorch_model.bin, tokenizer files; e.g. the Hugging Face repo laion/CLIP-ViT-g-14-laion2B-s12B-b42K, "
        "the paper's CLIP-score model)"
    )
    if not path:
        raise FileNotFoundError(f"No CLIP model configured: {fix}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"CLIP folder not found: {path} (config.eval.clip); {fix}")
    missing = []
    if not os.path.isfile(os.path.join(path, "config.json")):
        missing.append("config.json")
    if not any(os.path.isfile(os.path.join(path, f)) for f in CLIP_WEIGHT_FILES):
        missing.append(" or ".join(CLIP_WEIGHT_FILES[:2]) + " (the weights)")
    if not (
        os.path.isfile(os.path.join(path, "tokenizer.json"))
        or all(os.path.isfile(os.path.join(path, f)) for f in ("vocab.json", "merges.txt"))
    ):
        missing.append("tokenizer.json or vocab.json + merges.txt (the CLIP BPE tokenizer)")
    if missing:
        raise FileNotFoundError(
            f"CLIP folder {path} (config.eval.clip) is missing: {'; '.join(missing)}. To fix, {fix}"
        )
    return path


def _clip_preprocess(images: np.ndarray, size: int, mean, std) -> np.ndarray:
    """open_clip's eval transform (what GigaGAN applies): torchvision Resize(size) of the shortest side with PIL
    BICUBIC, CenterCrop(size), ToTensor (/255), Normalize(mean, std). uint8 [N,H,W,3] → float32 [N,3,size,size]."""
    from PIL import Image

    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    out = np.empty((images.shape[0], 3, size, size), np.float32)
    for i, img in enumerate(images):
        pil = Image.fromarray(img, "RGB")
        w, h = pil.size
        if w <= h:  # torchvision _compute_resized_output_size for an int size
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        pil = pil.resize((nw, nh), Image.BICUBIC)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))  # torchvision center_crop
        pil = pil.crop((left, top, left + size, top + size))
        arr = np.asarray(pil, dtype=np.float32) / np.float32(255.0)
        out[i] = ((arr - mean) / std).transpose(2, 0, 1)
    return out


class ClipScorer:
    """CLIP-score following GigaGAN's ``compute_clip_score`` (evaluation/evaluation.py), on a transformers CLIPModel.

    `path`: a CLIPModel folder — config.json, model.safetensors / pytorch_model.bin, tokenizer (tokenizer.json or
    vocab.json + merges.txt), optional preprocessor_config.json (image_mean / image_std; OpenAI's otherwise). E.g. the
    HF folder of laion/CLIP-ViT-g-14-laion2B-s12B-b42K, i.e. the weights of GigaGAN's open_clip ViT-g-14
    laion2b_s12b_b42k. Images: open_clip's eval preprocessing at the model's image size (see `_clip_preprocess`).
    Text: OpenAI CLIP tokenization (truncate=True, zero padding) with the 3 tokens of "A photo depicts " inserted after
    the start token, cut to the context length with the last column set to <|endoftext|> (49407) where non-pad; no
    attention mask (CLIP's causal mask makes the EOT state independent of the padding). Score = cosine of the
    projected image and text embeddings (fp32).
    """

    def __init__(self, path: str, device: str = "auto", batch_size: int = 64):
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        self.path = path = check_clip_folder(path)
        self.device = _resolve_device(device)
        self.batch_size = int(batch_size)
        self.model = CLIPModel.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        # transformers 5: CLIPTokenizer(vocab_file=..., merges_file=...) ignores the files; from_pretrained reads them.
        self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        if (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id) != (CLIP_SOT_ID, CLIP_EOT_ID):
            raise ValueError(
                f"{path}: tokenizer start/end ids are ({self.tokenizer.bos_token_id}, "
                f"{self.tokenizer.eos_token_id}), not CLIP's ({CLIP_SOT_ID}, {CLIP_EOT_ID})"
            )
        self.image_size = int(self.model.config.vision_config.image_size)
        self.context_length = int(self.model.config.text_config.max_position_embeddings)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pre_file = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pre_file):
            with open(pre_file) as f:
                pre = json.load(f)
            mean, std = tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))
        self.mean, self.std = mean, std
        self._prefix = self._openai_tokenize([CLIP_PROMPT_PREFIX])[0, 1:4]
        names = ["config.json"] + [
            f
            for f in os.listdir(path)
            if f in CLIP_WEIGHT_FILES
            or f.startswith(("model-0", "pytorch_model-0"))
            or f in ("tokenizer.json", "vocab.json", "merges.txt", "preprocessor_config.json")
        ]
        self.identity = f"clip/{os.path.basename(os.path.normpath(path))}/{_tree_fingerprint(path, names)}/gigagan"

    def _openai_tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """``clip.tokenize(texts, truncate=True)``: [SOT] + BPE + [EOT], cut to the context length (last = EOT),
        zero-padded."""
        n = self.context_length
        result = np.zeros((len(texts), n), np.int64)
        for i, ids in enumerate(self.tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]):
            tokens = [CLIP_SOT_ID] + list(ids) + [CLIP_EOT_ID]
            if len(tokens) > n:
                tokens = tokens[:n]
                tokens[-1] = CLIP_EOT_ID
            result[i, : len(tokens)] = tokens
        return result

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """GigaGAN's tokens: int64 [N, context_length] with "A photo depicts " after the start token."""
        tokens = self._openai_tokenize(prompts)
        n = self.context_length
        prefix = np.broadcast_to(self._prefix, (tokens.shape[0], 3))
        new = np.concatenate([tokens[:, :1], prefix, tokens[:, 1:]], axis=1)[:, :n].copy()
        new[:, n - 1] = np.where(new[:, n - 1] > 0, CLIP_EOT_ID, new[:, n - 1])
        return new

    @staticmethod
    def _features(out):
        return out if hasattr(out, "shape") else out.pooler_output  # transformers 5 returns a ModelOutput

    def image_embeds(self, images) -> np.ndarray:
        """uint8 [N,H,W,3] → float32 [N,D], L2-normalised projected image embeddings."""
        import torch

        x = _uint8_images(images)
        out = []
        with torch.no_grad():
            for s in range(0, x.shape[0], self.batch_size):
                pix = torch.from_numpy(
                    _clip_preprocess(x[s : s + self.batch_size], self.image_size, self.mean, self.std)
                ).to(self.device)
                e = self._features(self.model.get_image_features(pixel_values=pix)).float()
                out.append(torch.nn.functional.normalize(e, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """list[str] → float32 [N,D], L2-normalised projected text embeddings of GigaGAN's tokens."""
        import torch

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = []
        with torch.no_grad():
            for s in range(0, len(prompts), self.batch_size):
                ids = torch.from_numpy(self.tokenize(prompts[s : s + self.batch_size])).to(self.device)
                e = self._features(self.model.get_text_features(input_ids=ids)).float()
                out.append(torch.nn.functional.normalize(e, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    def scores(self, images, prompts: Sequence[str]) -> np.ndarray:
        """Per-pair cosine similarity, float32 [N] (CLIP-score = its mean; GigaGAN/the paper report it unscaled)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        return np.sum(self.image_embeds(images) * self.text_embeds(prompts), axis=-1).astype(np.float32)


# -------------------------------------------------------------------------------------------------------- DreamSim


def dreamsim_required_files(dreamsim_type: str) -> list[tuple[str, str]]:
    """[(path relative to the DreamSim folder, where it comes from)] that loading `dreamsim_type` offline needs."""
    from_zip = f"the DreamSim release zip for {dreamsim_type!r}"
    try:
        from dreamsim.config import dreamsim_weights

        from_zip = dreamsim_weights[dreamsim_type]
    except (ImportError, KeyError):
        pass
    if dreamsim_type not in DREAMSIM_REQUIRED_FILES:
        raise ValueError(
            f"Unsupported dreamsim_type {dreamsim_type!r} (one of {sorted(DREAMSIM_REQUIRED_FILES)}; "
            "the *_patch variants are not supported)"
        )
    required = [(name, from_zip) for name in DREAMSIM_REQUIRED_FILES[dreamsim_type]]
    if dreamsim_type in ("ensemble", "dino_vitb16"):
        required += _DREAMSIM_HUB_FILES["dino"]
    elif dreamsim_type == "dinov2_vitb14":
        required += _DREAMSIM_HUB_FILES["dinov2"]
    return required


def check_dreamsim_folder(path: str, dreamsim_type: str) -> str:
    """Raises FileNotFoundError naming every file DreamSim would otherwise try to download; returns the folder."""
    path = os.fspath(path) if path else ""
    required = dreamsim_required_files(dreamsim_type)
    fix = (
        f"Set config.eval.dreamsim to the folder holding the unzipped checkpoint (config.eval.dreamsim_type = "
        f"{dreamsim_type!r}). dreamsim.dreamsim(cache_dir=<folder>, dreamsim_type={dreamsim_type!r}) run once "
        "with internet access creates all of these files there."
    )
    if not path:
        raise FileNotFoundError(f"No DreamSim folder configured. {fix}")
    missing = [(name, src) for name, src in required if not os.path.exists(os.path.join(path, name))]
    if missing:
        lines = "\n".join(f"  {os.path.join(path, name)}  (from {src})" for name, src in missing)
        hub = ""
        if any(name.startswith(("facebookresearch_", "checkpoints/")) for name, _ in missing):
            hub = (
                "\nThe DINO branch is built by torch.hub.load with the hub dir set to this folder: it needs the "
                "repository checkout facebookresearch_<repo>_main/ (hubconf.py …) and the backbone weights in "
                "checkpoints/; the DreamSim zip has neither."
            )
        raise FileNotFoundError(f"DreamSim ({dreamsim_type}) files missing from {path}:\n{lines}{hub}\n{fix}")
    return path


class DreamSimEmbedder:
    """DreamSim (``dreamsim`` package) from a local checkpoint folder; never downloads.

    `path`: dreamsim's ``cache_dir`` — the unzipped release zip (``dreamsim.config.dreamsim_weights[dreamsim_type]``:
    ``*_pretrain.pth[.tar]`` + ``<tag>_lora/``) plus, for "ensemble"/"dino_vitb16", what torch.hub put there on the
    first online run (``facebookresearch_dino_main/`` and ``checkpoints/dino_vitbase16_pretrain.pth``; dinov2 likewise).
    With those present torch.hub stays offline (the ref "main" is explicit, the cached repo is used, facebookresearch is
    a trusted owner); it does create/append ``<path>/trusted_list``, so the folder must be writable. ("dinov2_vitb14":
    torch.hub first tries github.com to resolve the default branch, then falls back to the cached repo.)
    The model is ``dreamsim.dreamsim(pretrained=True, cache_dir=path, normalize_embeds=True, ...)``; images go through
    DreamSim's own preprocessing (PIL → Resize((224,224), BICUBIC) → ToTensor).
    """

    def __init__(self, path: str, dreamsim_type: str = "ensemble", device: str = "auto", batch_size: int = 32):
        import torch

        path = check_dreamsim_folder(path, dreamsim_type)
        from dreamsim import dreamsim

        self.path, self.dreamsim_type = path, dreamsim_type
        self.device = _resolve_device(device)
        self.batch_size = int(batch_size)
        previous_hub = torch.hub.get_dir()
        try:
            with warnings.catch_warnings():  # dreamsim wraps its model in peft twice (upstream, harmless)
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.model, self._preprocess = dreamsim(
                    pretrained=True,
                    device=self.device,
                    cache_dir=path,
                    normalize_embeds=True,
                    dreamsim_type=dreamsim_type,
                )
        finally:
            torch.hub.set_dir(previous_hub)  # dreamsim's DINO loader sets the process-wide hub dir to `path`
        self.model.eval().requires_grad_(False)
        names = [name for name, _ in dreamsim_required_files(dreamsim_type)]
        names = [n.split("/")[0] if n.startswith("facebookresearch_") else n for n in names]
        self.identity = f"dreamsim/{dreamsim_type}/{_tree_fingerprint(path, names)}"

    def _batch(self, images: np.ndarray):
        import torch
        from PIL import Image

        return torch.cat([self._preprocess(Image.fromarray(img, "RGB")) for img in images]).to(self.device)

    def embed(self, images) -> np.ndarray:
        """uint8 [N,H,W,3] → float32 [N,D] (DreamSim's normalised embedding; distance = 1 − cos)."""
        import torch

        x = _uint8_images(images)
        out = []
        with torch.no_grad():
            for s in range(0, x.shape[0], self.batch_size):
                e = self.model.embed(self._batch(x[s : s + self.batch_size]))
                out.append(e.reshape(e.shape[0], -1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def distance(self, a_images, b_images) -> np.ndarray:
        """DreamSim distance of pairs (the model's forward: 1 − cos of the embeddings), float32 [N]."""
        import torch

        a, b = _uint8_images(a_images, "a_images"), _uint8_images(b_images, "b_images")
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{a.shape[0]} vs {b.shape[0]} images")
        out = []
        with torch.no_grad():
            for s in range(0, a.shape[0], self.batch_size):
                d = self.model(self._batch(a[s : s + self.batch_size]), self._batch(b[s : s + self.batch_size]))
                out.append(d.reshape(-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0,), np.float32)
