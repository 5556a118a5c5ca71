"""Oracles for the loss tests: the official `elatentlpips` / `lpips` PyTorch modules, built from random weights
written in their real checkpoint layouts.

`elatentlpips.ELatentLPIPS(pretrained=True)` reads `./ckpt/{encoder}_latent_vgg16.pth.tar` and
`./ckpt/{encoder}_latest_vgg16_tuned.pth` (both strict `load_state_dict`s); we write both files into a tmp dir,
chdir there and build it. Its `pnet_rand=True` path builds a 3-channel VGG (a bug), so it is not used.

Speed: torchvision's VGG16 constructors spend ~9 s (2 cores) randomly initialising the 120M-parameter ImageNet
classifier. Every tensor of the oracles is overwritten by the strict checkpoint loads (or, for LPIPS' trunk,
by `load_state_dict` below), so `skip_torch_init` (tests/torch_oracles.py) turns `torch.nn.init` into no-ops while
they are built. The trunk file's classifier tensors are zero tensors expanded to the real shapes (stride 0: a
4-byte storage each), which `torch.save`/`torch.load` round-trip as tensors of the real shapes.
"""

from __future__ import annotations

import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_oracles import cwd, skip_torch_init

from d2g_jax.losses import augment
from d2g_jax.losses.latent_vgg import vgg_layers

SLICES = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 44))  # elatentlpips' CalibratedLatentVGG16BN slices
CLASSIFIER = {"0.weight": (4096, 25088), "0.bias": (4096,), "3.weight": (4096, 4096), "3.bias": (4096,),
              "6.weight": (1000, 4096), "6.bias": (1000,)}  # fmt: skip


def random_vgg_features(g: torch.Generator, in_channels: int, batch_norm: bool) -> dict[str, torch.Tensor]:
    """`{'{i}.weight': ...}` for torchvision's `vgg16[_bn].features` with non-trivial BN statistics."""
    sd, cin = {}, in_channels
    for kind, i, ch in vgg_layers(batch_norm):
        if kind == "conv":
            sd[f"{i}.weight"] = torch.randn(ch, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
            sd[f"{i}.bias"] = torch.randn(ch, generator=g) * 0.1
            cin = ch
        elif kind == "bn":
            sd[f"{i}.weight"] = 0.5 + torch.rand(ch, generator=g)
            sd[f"{i}.bias"] = torch.randn(ch, generator=g) * 0.2
            sd[f"{i}.running_mean"] = torch.randn(ch, generator=g) * 0.3
            sd[f"{i}.running_var"] = 0.3 + 1.7 * torch.rand(ch, generator=g)
            sd[f"{i}.num_batches_tracked"] = torch.tensor(1000)
    return sd


def random_heads(g: torch.Generator) -> dict[str, torch.Tensor]:
    """Calibrated heads are non-negative 1×1 convs `[1, C, 1, 1]`."""
    chans = (64, 128, 256, 512, 512)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(chans)}


def write_official_checkpoints(ckpt: str, encoder: str, channels: int, seed: int) -> None:
    """Writes both official files; the tuned file's trunk differs from the trunk file's, as the official loader
    lets the tuned file win (a loader that used the wrong one would fail parity)."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(ckpt, exist_ok=True)
    trunk = {f"module.model.features.{k}": v for k, v in random_vgg_features(g, channels, True).items()}
    trunk.update({f"module.model.classifier.{k}": torch.zeros(()).expand(s) for k, s in CLASSIFIER.items()})
    torch.save({"epoch": 90, "arch": "vgg16_bn", "state_dict": trunk, "best_acc1": torch.tensor(68.26)},
               os.path.join(ckpt, f"{encoder}_latent_vgg16.pth.tar"))  # fmt: skip
    tuned = {}
    for k, v in random_vgg_features(g, channels, True).items():
        i = int(k.split(".")[0])
        s = next(n for n, (a, b) in enumerate(SLICES, 1) if a <= i < b)
        tuned[f"net.slice{s}.{k}"] = v
    for k, v in random_heads(g).items():
        tuned[k] = v
        tuned["lins." + k[3:]] = v  # nn.ModuleList alias of the same heads
    torch.save(tuned, os.path.join(ckpt, f"{encoder}_latest_vgg16_tuned.pth"))


@pytest.fixture(scope="session")
def official(tmp_path_factory):
    """`official(encoder) -> (oracle ELatentLPIPS (augment='bgco', eval), ckpt_dir)`, cached per encoder."""
    import elatentlpips

    cache = {}

    def build(encoder: str):
        if encoder not in cache:
            channels = 16 if encoder in ("sd3", "flux") else 4
            root = tmp_path_factory.mktemp(f"official_{encoder}")
            write_official_checkpoints(str(root / "ckpt"), encoder, channels, seed=len(cache) + 1)
            with cwd(root), skip_torch_init():
                model = elatentlpips.ELatentLPIPS(pretrained=True, encoder=encoder, augment="bgco", verbose=False)
            cache[encoder] = (model.eval(), str(root / "ckpt"))
        return cache[encoder]

    return build


@pytest.fixture(scope="session")
def official_pixel(tmp_path_factory):
    """`(lpips.LPIPS(net='vgg') with its bundled v0.1 heads and a random trunk, vgg16_path, lin_path)`."""
    import lpips

    with skip_torch_init():
        model = lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False).eval()
    feats = random_vgg_features(torch.Generator().manual_seed(7), 3, False)
    slices = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # lpips.pretrained_networks.vgg16
    net_sd = {}
    for k, v in feats.items():
        i = int(k.split(".")[0])
        s = next(n for n, (a, b) in enumerate(slices, 1) if a <= i < b)
        net_sd[f"slice{s}.{k}"] = v
    model.net.load_state_dict(net_sd, strict=True)
    root = tmp_path_factory.mktemp("lpips")
    vgg16_path = str(root / "vgg16-397923af.pth")
    sd = {f"features.{k}": v for k, v in feats.items()}
    sd.update({f"classifier.{k}": torch.zeros(()).expand(s) for k, s in CLASSIFIER.items()})
    torch.save(sd, vgg16_path, _use_new_zipfile_serialization=False)  # torchvision's file predates the zip format
    lin_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    return model, vgg16_path, lin_path


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def replay_official_draws(seed: int, b: int, h: int, w: int) -> augment.AugmentParams:
    """Re-issues the official AdaAugment's torch.rand/randn calls for preset 'bgco' (same order and shapes, same
    seed: same numbers) and maps them to our explicit parameters with ADA's formulas. Every op is followed by
    its gate draw `rand < multiplier · p`, which always passes at p = 1 (`gate()` consumes it)."""
    torch.manual_seed(seed)
    r, n = torch.rand, torch.randn
    gate = lambda shape=(b,): r(list(shape))  # noqa: E731
    xflip = torch.floor(r([b]) * 2)
    gate()
    rot90 = torch.floor(r([b]) * 4)
    gate()
    t = (r([b, 2]) * 2 - 1) * 0.125
    gate((b, 1))
    int_shift = (torch.round(t[:, 0] * w), torch.round(t[:, 1] * h))
    scale = torch.exp2(n([b]) * 0.2)
    gate()
    rot_pre = (r([b]) * 2 - 1) * math.pi
    gate()
    aniso = torch.exp2(n([b]) * 0.2)
    gate()
    rot_post = (r([b]) * 2 - 1) * math.pi
    gate()
    t = n([b, 2]) * 0.125
    gate((b, 1))
    frac_shift = (t[:, 0] * w, t[:, 1] * h)
    bright, contrast, sat = (r(b, 1, 1, 1).reshape(b) for _ in range(3))
    gate((b, 1, 1, 1, 1))  # cutout
    center = r([b, 2, 1, 1, 1]).reshape(b, 2)
    j = lambda v: jnp.asarray(v.numpy())  # noqa: E731
    g = augment.geometric_matrix(
        b, xflip=j(xflip), rot90=j(rot90), int_shift=tuple(map(j, int_shift)), scale=j(scale),
        rotate_pre=j(rot_pre), aniso=j(aniso), rotate_post=j(rot_post), frac_shift=tuple(map(j, frac_shift)),
    )  # fmt: skip
    return augment.AugmentParams(
        g, j(bright - 0.5), j(contrast + 0.5), j(sat * 2), j(center), jnp.full((b,), augment.CUTOUT_SIZE)
    )
