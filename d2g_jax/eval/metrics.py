"""Metric math of the paper's evaluation (§4): FID, improved Precision & Recall, CLIP-score, DreamSim, DreamDiv.

Everything here works on precomputed features / embeddings (numpy in, Python floats out); the networks that
produce them (InceptionV3 pool features, CLIP and DreamSim embeddings) live in ``d2g_jax.eval.extractors`` and the
image preprocessing in ``d2g_jax.eval.resize``.

* FID: clean-fid's ``frechet_distance`` (which GigaGAN's evaluation, followed by the paper, calls), reproduced
  operation for operation, except that where clean-fid would silently return NaN we raise.
* Precision & Recall: Kynkäänniemi et al. 2019 [44], with StyleGAN2-ADA's conventions (``metrics/precision_recall.py``:
  k = 3, radius = distance to the k-th nearest other point of the same set, a probe is covered if
  ``dist <= radius`` of any ball). StyleGAN2-ADA stores the radii in float16; we keep float64.
* CLIP-score: GigaGAN's ``compute_clip_score``, the mean of ``F.cosine_similarity(img_emb, txt_emb)`` (not ×100, not
  clipped at 0).
* DreamSim distance ``1 - F.cosine_similarity(emb_a, emb_b)`` (DreamSim's own definition); DreamSim-5k is its mean
  over (teacher, student) pairs generated from the same noise and prompt.
* DreamDiv: mean pairwise DreamSim distance among the 8 images generated for one prompt, averaged over prompts.
* Attribute-classifier metrics (``config.eval.classifier``, ``d2g_jax.eval.attributes``): ``fd`` / ``fd_pr`` are the
  Fréchet distance and precision/recall above on the classifier's penultimate features; ``prompt_accuracy``
  compares predicted classes with the classes a prompt names; ``teacher_dist`` is ``cosine_distance`` (as DreamSim's)
  of the classifier features of student and teacher images from the same noise, ``pixel_rmse`` its pixel twin.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import linalg

__all__ = [
    "clip_score",
    "cosine_distance",
    "cosine_similarity",
    "dreamdiv",
    "dreamsim_distance",
    "feature_stats",
    "fid_from_features",
    "fid_from_stats",
    "frechet_distance",
    "knn_radii",
    "pairwise_mean_distance",
    "pixel_rmse",
    "precision_recall",
    "prompt_accuracy",
]

# torch.nn.functional.cosine_similarity's default eps (guards zero-norm vectors).
_COS_EPS = 1e-8


# ----------------------------------------------------------------------------------------------------------------
# FID


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian statistics of features, as clean-fid: ``np.mean(axis=0)`` and ``np.cov(rowvar=False)``.

    Features are cast to float64 first (clean-fid keeps a float32 mean for float32 features; the covariance is
    float64 either way), so for float64 input this is bit-identical to clean-fid.

    Args:
      feats: ``[N, D]`` with N >= 2 (e.g. InceptionV3 pool3 features, D = 2048).

    Returns:
      ``(mu float64 [D], sigma float64 [D, D])`` (sigma unbiased, divided by N - 1).
    """
    feats = np.asarray(feats)
    if feats.ndim != 2:
        raise ValueError(f"feats must have shape [N, D], got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"feats needs N >= 2 samples for a covariance, got shape {feats.shape}")
    feats = feats.astype(np.float64, copy=False)
    return np.mean(feats, axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): ``|mu1-mu2|² + tr(s1 + s2 - 2 (s1 s2)^½)``.

    Same computation as ``cleanfid.fid.frechet_distance``: ``scipy.linalg.sqrtm(sigma1 @ sigma2)``; if that is not
    finite (singular product) retry with ``eps`` added to both diagonals (with a warning, where clean-fid prints);
    a complex result is accepted only if the imaginary part of its diagonal is within 1e-3 of 0, then its real part is
    used. Inputs are cast to float64.

    Where clean-fid raises on a significant imaginary component, a product of two PSD but rank-deficient
    covariances (fewer samples than dimensions, e.g. smoke tests) is instead evaluated through the symmetric form
    ``tr((s1^½ s2 s1^½)^½)`` (mathematically the same trace), with a warning.

    Raises:
      ValueError: mismatched shapes, non-finite inputs, a square root still non-finite after the ``eps`` retry
        (clean-fid would return NaN), or a significant imaginary component with a non-PSD covariance.

    Args:
      mu1, mu2: ``[D]`` means.
      sigma1, sigma2: ``[D, D]`` covariances.
      eps: diagonal offset of the singular-product retry.

    Returns:
      The distance as a Python float.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must both have shape [D], got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"sigma1, sigma2 must have shape [D, D] = {(d, d)}, got {sigma1.shape} and {sigma2.shape}")
    for name, x in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")

    diff = mu1 - mu2
    # Product might be almost singular.
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates", stacklevel=2
        )
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError(f"sqrtm(sigma1 @ sigma2) is not finite even after adding {eps} to the diagonals")
    # Numerical error might give a slight imaginary component.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            tr = _psd_trace_sqrt_product(sigma1, sigma2)
            if tr is None:
                raise ValueError(f"Imaginary component {m} in sqrtm(sigma1 @ sigma2): covariances not PSD?")
            # Rank-deficient covariances (fewer samples than feature dimensions): sqrtm of the product is
            # numerically complex although the quantity is real; clean-fid raises here. Use the symmetric form.
            warnings.warn(f"sqrtm(sigma1 @ sigma2) has an imaginary component {m:.3g} (rank-deficient covariances: "
                          "fewer samples than feature dimensions?); using tr((s1^½ s2 s1^½)^½) instead. FID on so "
                          "few samples is not comparable with published numbers.", stacklevel=2)  # fmt: skip
            return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr)
        covmean = covmean.real
    tr_covmean = np.trace(covmean)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _psd_trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, tol: float = 1e-8) -> float | None:
    """tr((σ1 σ2)^½) = tr((σ1^½ σ2 σ1^½)^½) for PSD σ1, σ2 through symmetric eigendecompositions (stable for
    singular matrices); None when either is not PSD (an eigenvalue below −tol·max|λ|)."""
    w1, v1 = np.linalg.eigh(sigma1)
    w2 = np.linalg.eigvalsh(sigma2)
    for w in (w1, w2):
        if w.min() < -tol * max(np.abs(w).max(), 1e-300):
            return None
    s1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T
    m = np.linalg.eigvalsh(s1 @ sigma2 @ s1)
    return float(np.sqrt(np.clip(m, 0, None)).sum())


def fid_from_stats(
    stats1: tuple[np.ndarray, np.ndarray], stats2: tuple[np.ndarray, np.ndarray], eps: float = 1e-6
) -> float:
    """FID from two ``(mu [D], sigma [D, D])`` pairs (e.g. precomputed reference statistics)."""
    (mu1, sigma1), (mu2, sigma2) = stats1, stats2
    return frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray, eps: float = 1e-6) -> float:
    """FID between two feature sets ``[N1, D]`` and ``[N2, D]`` (clean-fid's ``fid_from_feats``)."""
    return fid_from_stats(feature_stats(feats1), feature_stats(feats2), eps=eps)


# ----------------------------------------------------------------------------------------------------------------
# Improved precision & recall (Kynkäänniemi et al. 2019)


def _check_feats(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N, D] with N > 0, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    return x.astype(np.float64, copy=False)


def _sq_dists(a: np.ndarray, a_sq: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[len(a), len(b)]`` via ``|a|² + |b|² - 2 a·b`` (float64, clamped at 0)."""
    d = a @ b.T
    d *= -2.0
    d += a_sq[:, None]
    d += b_sq[None, :]
    np.maximum(d, 0.0, out=d)
    return d


def _knn_sq_radii(x: np.ndarray, x_sq: np.ndarray, k: int, batch: int) -> np.ndarray:
    n = x.shape[0]
    out = np.empty(n, dtype=np.float64)
    for i0 in range(0, n, batch):
        i1 = min(i0 + batch, n)
        d = _sq_dists(x[i0:i1], x_sq[i0:i1], x, x_sq)
        d[np.arange(i1 - i0), np.arange(i0, i1)] = np.inf  # exclude the point itself (not its duplicates)
        out[i0:i1] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return out


def knn_radii(feats: np.ndarray, k: int = 3, batch: int = 1024) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour in the same set, the point itself excluded.

    Equals StyleGAN2-ADA's ``dist.kthvalue(k + 1)`` (the self-distance 0 being the first). Duplicates of a point
    count as neighbours at distance 0.

    Args:
      feats: ``[N, D]``, N > k.
      k: neighbourhood size.
      batch: rows per distance chunk (memory ≈ 2 · batch · N · 8 bytes).

    Returns:
      float64 ``[N]``.
    """
    x = _check_feats(feats, "feats")
    _check_k(k, x.shape[0], "feats")
    x_sq = np.einsum("ij,ij->i", x, x)
    return np.sqrt(_knn_sq_radii(x, x_sq, k, _check_batch(batch)))


def _check_k(k: int, n: int, name: str) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive int, got {k}")
    if n <= k:
        raise ValueError(f"{name} needs more than k={k} samples for a k-NN radius, got {n}")


def _check_batch(batch: int) -> int:
    if int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch}")
    return int(batch)


def _coverage(
    probes: np.ndarray,
    probes_sq: np.ndarray,
    manifold: np.ndarray,
    manifold_sq: np.ndarray,
    radii_sq: np.ndarray,
    batch: int,
) -> float:
    """Share of probes within ``radius`` of at least one manifold point (``dist <= radius``)."""
    hits = 0
    for i0 in range(0, probes.shape[0], batch):
        i1 = min(i0 + batch, probes.shape[0])
        d = _sq_dists(probes[i0:i1], probes_sq[i0:i1], manifold, manifold_sq)
        hits += int(np.count_nonzero((d <= radii_sq[None, :]).any(axis=1)))
    return hits / probes.shape[0]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), StyleGAN2-ADA conventions.

    The manifold of a set is the union of balls around its points, each ball's radius being the distance to the
    point's k-th nearest neighbour within the set (itself excluded). Precision = share of ``fake`` inside the
    ``real`` manifold; recall = share of ``real`` inside the ``fake`` manifold; "inside" is ``dist <= radius``.

    Distances are computed in float64 as ``|a|² + |b|² - 2 a·b`` in row chunks of ``batch``; squared distances are
    compared with squared radii (same decisions as comparing distances). Memory: the float64 copies of the inputs
    (``(N + M) · D · 8`` bytes) plus ≈ 3 · batch · max(N, M) · 8 bytes of distance chunks: for N = M = 10k,
    D = 2048, batch = 1024: ≈ 330 MB + 250 MB.

    Args:
      real: ``[N, D]`` real features (N > k).
      fake: ``[M, D]`` generated features (M > k).
      k: neighbourhood size (3 in the paper / StyleGAN2-ADA).
      batch: rows per distance chunk.

    Returns:
      ``(precision, recall)`` as Python floats in [0, 1].
    """
    real = _check_feats(real, "real")
    fake = _check_feats(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real [N, D] and fake [M, D] must share D, got shapes {real.shape} and {fake.shape}")
    _check_k(k, real.shape[0], "real")
    _check_k(k, fake.shape[0], "fake")
    batch = _check_batch(batch)
    real_sq = np.einsum("ij,ij->i", real, real)
    fake_sq = np.einsum("ij,ij->i", fake, fake)
    real_r2 = _knn_sq_radii(real, real_sq, k, batch)
    fake_r2 = _knn_sq_radii(fake, fake_sq, k, batch)
    precision = _coverage(fake, fake_sq, real, real_sq, real_r2, batch)
    recall = _coverage(real, real_sq, fake, fake_sq, fake_r2, batch)
    return precision, recall


# ----------------------------------------------------------------------------------------------------------------
# Cosine metrics: CLIP-score, DreamSim, DreamDiv


def _check_pair(a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape or a.shape[0] == 0:
        raise ValueError(f"{names[0]}, {names[1]} must have the same shape [N, D], N > 0, got {a.shape}, {b.shape}")
    return a, b


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity ``[N]`` of ``[N, D]`` arrays, as ``torch.nn.functional.cosine_similarity(dim=1)``.

    ``a·b / max(|a| |b|, 1e-8)`` in float64.
    """
    a, b = _check_pair(a, b, ("a", "b"))
    num = np.einsum("nd,nd->n", a, b)
    den = np.sqrt(np.einsum("nd,nd->n", a, a) * np.einsum("nd,nd->n", b, b))
    return num / np.maximum(den, _COS_EPS)


def clip_score(img_emb: np.ndarray, txt_emb: np.ndarray) -> float:
    """CLIP-score as GigaGAN's ``compute_clip_score``: mean cosine similarity of paired embeddings.

    Not multiplied by 100 and not clipped at 0 (the paper reports e.g. 0.31).

    Args:
      img_emb: ``[N, D]`` CLIP image embeddings.
      txt_emb: ``[N, D]`` CLIP text embeddings of the matching prompts.
    """
    img_emb, txt_emb = _check_pair(img_emb, txt_emb, ("img_emb", "txt_emb"))
    return float(np.mean(cosine_similarity(img_emb, txt_emb)))


def dreamsim_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """DreamSim distance ``1 - cos(a_i, b_i)`` per pair, DreamSim's own ``1 - F.cosine_similarity(embed_a, embed_b)``.

    Args:
      a, b: ``[N, D]`` DreamSim embeddings.

    Returns:
      float64 ``[N]`` in [0, 2]. DreamSim-5k is its mean over teacher/student pairs from the same noise.
    """
    a, b = _check_pair(a, b, ("a", "b"))
    return 1.0 - cosine_similarity(a, b)


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _COS_EPS)


def pairwise_mean_distance(emb: np.ndarray) -> float:
    """Mean cosine distance ``1 - cos(e_i, e_j)`` over the K(K-1)/2 unordered pairs i < j.

    Args:
      emb: ``[K, D]`` embeddings, K >= 2.
    """
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(f"emb must have shape [K, D] with K >= 2, got shape {emb.shape}")
    e = _normalize_rows(emb)
    iu = np.triu_indices(e.shape[0], k=1)
    return float(np.mean(1.0 - (e @ e.T)[iu]))


def dreamdiv(emb: np.ndarray) -> float:
    """DreamDiv (paper §4.2): per prompt, mean pairwise DreamSim distance among its K images; mean over prompts.

    Args:
      emb: ``[P, K, D]`` DreamSim embeddings, P prompts × K images per prompt (K = 8 in the paper), K >= 2.

    Returns:
      Python float (higher = more diverse).
    """
    emb = np.asarray(emb, dtype=np.float64)
    if emb.ndim != 3 or emb.shape[0] == 0 or emb.shape[1] < 2:
        raise ValueError(f"emb must have shape [P, K, D], P >= 1, K >= 2 images per prompt, got {emb.shape}")
    return float(np.mean([pairwise_mean_distance(e) for e in emb]))


# ----------------------------------------------------------------------------------------------------------------
# Attribute-classifier metrics


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``1 - cos(a_i, b_i)`` per pair (float64 ``[N]``, in [0, 2]; [0, 1] for non-negative features such as the
    attribute classifier's post-ReLU ones). The same formula as `dreamsim_distance`."""
    a, b = _check_pair(a, b, ("a", "b"))
    return 1.0 - cosine_similarity(a, b)


def pixel_rmse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image root-mean-square pixel difference of uint8 ``[N, H, W, C]`` images, in units of the full range
    (pixels / 255): float64 ``[N]`` in [0, 1]."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 4 or a.shape[0] == 0:
        raise ValueError(f"a, b must be image batches of the same shape [N, H, W, C], N > 0; got {a.shape}, {b.shape}")
    d = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    return np.sqrt(np.mean(d * d, axis=(1, 2, 3)))


def prompt_accuracy(parsed: Sequence[Mapping[str, int | None]], predicted: Mapping[str, np.ndarray]) -> dict:
    """How often the classifier sees in an image what its prompt names.

    Args:
      parsed: per image, {attribute: class index named by its prompt, or None when the prompt does not name
        exactly one class of that attribute} (``attributes.parse_attributes``).
      predicted: {attribute: int ``[N]`` predicted class per image}; the same attributes, in any order.

    Returns:
      ``prompt_acc``: share of images whose every attribute is predicted as named, over the images whose prompt
      names every attribute (``prompt_acc_num`` of them; the others are counted in ``prompt_unparseable``);
      ``prompt_acc_<attribute>``: share of images predicted as named for that attribute, over the images whose
      prompt names it (``prompt_acc_<attribute>_num``).

    Raises:
      ValueError: mismatched lengths or attributes, or no prompt naming every attribute.
    """
    names = list(predicted)
    n = len(parsed)
    for a in names:
        if np.shape(predicted[a]) != (n,):
            raise ValueError(f"predicted[{a!r}] has shape {np.shape(predicted[a])}, expected [{n}] (one per prompt)")
    for i, p in enumerate(parsed):
        if set(p) != set(names):
            raise ValueError(f"parsed[{i}] has attributes {sorted(p)}, predicted has {sorted(names)}")
    full = np.array([all(p[a] is not None for a in names) for p in parsed], bool)
    if not full.any():
        raise ValueError(f"prompt_acc: none of the {n} prompts names exactly one class of every attribute "
                         f"({', '.join(names)}); use prompts in the classifier's vocabulary (its config.json "
                         "'attributes'), or drop prompt_acc from config.eval.metrics.")  # fmt: skip
    out: dict[str, float | int] = {}
    hits = np.ones(n, bool)
    for a in names:
        named = np.array([-1 if p[a] is None else int(p[a]) for p in parsed])
        ok = named >= 0
        right = ok & (np.asarray(predicted[a]) == named)
        hits &= right
        out[f"prompt_acc_{a}"] = float(right[ok].mean())
        out[f"prompt_acc_{a}_num"] = int(ok.sum())
    return {"prompt_acc": float(hits[full].mean()), "prompt_acc_num": int(full.sum()),
            "prompt_unparseable": int((~full).sum()), **out}  # fmt: skip
