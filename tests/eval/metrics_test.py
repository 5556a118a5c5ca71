"""Metric math (d2g_jax.eval.metrics) vs clean-fid, brute force, torch and hand-counted answers."""

import warnings

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid_fid

from d2g_jax.eval import metrics


def _cleanfid_fd(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's deprecation of sqrtm(disp=...) used by clean-fid, LinAlgWarning
        return cleanfid_fid.frechet_distance(*args)


def _feats(seed: int, n: int, d: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


# ----------------------------------------------------------------------------------------------------------------
# FID. Tolerance vs clean-fid: rel 1e-9 (same float64 operations; in practice bit-identical).


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n,d", [(500, 16), (200, 64), (30, 64)], ids=["N>>D", "N>D", "D>N-singular"])
def test_frechet_distance_matches_cleanfid(seed, n, d):
    a = _feats(seed, n, d)
    b = _feats(seed + 100, n + 7, d, shift=0.3, scale=1.2)
    mu1, s1 = np.mean(a, axis=0), np.cov(a, rowvar=False)
    mu2, s2 = np.mean(b, axis=0), np.cov(b, rowvar=False)
    ref = _cleanfid_fd(mu1, s1, mu2, s2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LinAlgWarning from sqrtm on the singular (D > N) product
        ours = metrics.frechet_distance(mu1, s1, mu2, s2)
        ours_feats = metrics.fid_from_features(a, b)
        ref_feats = cleanfid_fid.fid_from_feats(a, b)
    assert isinstance(ours, float)
    assert ours == pytest.approx(ref, rel=1e-9)
    assert ours_feats == pytest.approx(ref_feats, rel=1e-9)
    assert ours > 0.0


def test_frechet_distance_closed_form_diagonal():
    # Commuting (diagonal) covariances: FID = |mu1 - mu2|² + sum_i (sqrt(a_i) - sqrt(b_i))².
    a = np.array([1.0, 4.0, 9.0, 0.25])
    b = np.array([4.0, 1.0, 9.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = 1.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0 + (0.5 - 1) ** 2
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert metrics.fid_from_stats((mu1, np.diag(a)), (mu1, np.diag(a))) == pytest.approx(0.0, abs=1e-12)


def test_feature_stats_matches_cleanfid_convention():
    x = _feats(3, 300, 12, shift=2.0)
    mu, sigma = metrics.feature_stats(x)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert mu.shape == (12,) and sigma.shape == (12, 12)
    # clean-fid: np.mean(feats, axis=0), np.cov(feats, rowvar=False): unbiased, features in columns.
    np.testing.assert_array_equal(mu, np.mean(x, axis=0))
    np.testing.assert_array_equal(sigma, np.cov(x, rowvar=False))
    xc = x - x.mean(0)
    np.testing.assert_allclose(sigma, xc.T @ xc / (300 - 1), rtol=1e-12, atol=1e-12)
    # float32 features (as Inception outputs): we accumulate in float64; clean-fid's float32 mean differs ~1e-7.
    mu32, sigma32 = metrics.feature_stats(x.astype(np.float32))
    assert mu32.dtype == np.float64
    np.testing.assert_allclose(mu32, np.mean(x.astype(np.float32), axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sigma32, np.cov(x.astype(np.float32), rowvar=False))


def test_frechet_distance_singular_product_retry_matches_cleanfid():
    # sqrtm of a Jordan block is not finite: both retry with eps on the diagonals and agree.
    s1 = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    s2 = np.eye(3)
    mu = np.zeros(3)
    ref = _cleanfid_fd(mu, s1, mu, s2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=RuntimeWarning)
        with pytest.warns(UserWarning, match="singular product"):
            ours = metrics.frechet_distance(mu, s1, mu, s2)
    assert np.isfinite(ref)
    assert ours == pytest.approx(ref, rel=1e-9)


def test_frechet_distance_errors_where_cleanfid_errors_or_returns_nan():
    mu = np.zeros(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Not PSD → large imaginary component: clean-fid raises ValueError, so do we.
        with pytest.raises(ValueError, match="Imaginary component"):
            _cleanfid_fd(mu, np.diag([1.0, -1.0]), mu, np.eye(2))
        with pytest.raises(ValueError, match="Imaginary component"):
            metrics.frechet_distance(mu, np.diag([1.0, -1.0]), mu, np.eye(2))
        # NaN covariance: clean-fid silently returns NaN; we raise.
        bad = np.array([[np.nan, 0.0], [0.0, 1.0]])
        assert np.isnan(_cleanfid_fd(mu, bad, mu, np.eye(2)))
        with pytest.raises(ValueError, match="NaN"):
            metrics.frechet_distance(mu, bad, mu, np.eye(2))
    with pytest.raises(ValueError, match=r"\[D\]"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"\[D, D\]"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        metrics.feature_stats(np.zeros(5))


# ----------------------------------------------------------------------------------------------------------------
# Precision & recall


def _brute_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Direct StyleGAN2-ADA recipe: full distance matrices, radius = (k+1)-th smallest incl. self (0)."""
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
    d_fr = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    r_real = np.sort(d_rr, axis=1)[:, k]
    r_fake = np.sort(d_ff, axis=1)[:, k]
    precision = np.mean([(d_fr[j] <= r_real).any() for j in range(len(fake))])
    recall = np.mean([(d_fr[:, i] <= r_fake).any() for i in range(len(real))])
    return float(precision), float(recall)


def test_precision_recall_hand_counted_1d():
    # real = {0, 1, 3, 7}, k = 1: NN radii 1, 1, 2, 4 → balls [-1,1], [0,2], [1,5], [3,11].
    real = np.array([[0.0], [1.0], [3.0], [7.0]])
    # fake: -1 (on the boundary of ball(0)), 1.5 (inside), 5 (inside ball(7) and on boundary of ball(3)),
    # 11 (on the boundary of ball(7)), 11.5 and -2 (outside) → precision 4/6 (with '<' it would be 3/6).
    # fake sorted -2, -1, 1.5, 5, 11, 11.5, k = 1: radii 1, 1, 2.5, 3.5, 0.5, 0.5 → balls
    # [-3,-1], [-2,0], [-1,4], [1.5,8.5], [10.5,11.5], [11,12]: real 0 (boundary of ball(-1), inside ball(1.5)),
    # 1, 3 (inside ball(1.5)), 7 (inside ball(5)) → recall 1.
    fake = np.array([[-1.0], [1.5], [5.0], [11.0], [11.5], [-2.0]])
    assert metrics.precision_recall(real, fake, k=1) == (4 / 6, 1.0)
    # k = 2: real radii: 0 → {1,3,7} → 3; 1 → {1,2,6} → 2; 3 → {3,2,4} → 3; 7 → {7,6,4} → 6:
    # balls [-3,3], [-1,3], [0,6], [1,13]: every fake (-2 included, in ball(0)) → precision 1.
    # fake radii (k=2): -2 → {1,3.5,7,13,13.5} → 3.5; -1 → 2.5; 1.5 → 3.5; 5 → 6; 11 → 6; 11.5 → 6.5;
    # every real point is within 3.5 of -2 or 1.5 → recall 1.
    assert metrics.precision_recall(real, fake, k=2) == (1.0, 1.0)
    np.testing.assert_array_equal(metrics.knn_radii(real, k=1), [1.0, 1.0, 2.0, 4.0])
    np.testing.assert_array_equal(metrics.knn_radii(real, k=2), [3.0, 2.0, 3.0, 6.0])
    np.testing.assert_array_equal(metrics.knn_radii(real, k=3), [7.0, 6.0, 4.0, 7.0])


def test_precision_recall_hand_counted_2d_boundary_recall():
    # real: unit square corners + far point (10, 0); k = 1 radii: 1, 1, 1, 1, 9 ((10,0)'s NN is (1,0)).
    real = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [10, 0]], dtype=float)
    # fake: a tight pair near the origin and a tight pair at (5, 0): radii 0.5 each (k = 1).
    fake = np.array([[0, 0], [0.5, 0], [5, 0], [5.5, 0]], dtype=float)
    # precision: (0,0), (0.5,0) inside the square's balls; (5,0), (5.5,0) inside ball((10,0), 9) → 1.
    # recall: real (0,0) dist 0 ≤ 0.5 ✓; (1,0) dist 0.5 ≤ 0.5 ✓ (boundary); (0,1) dist ≥ 1 ✗; (1,1) ✗;
    # (10,0) dist 4.5 > 0.5 ✗ → 2/5.
    assert metrics.precision_recall(real, fake, k=1) == (1.0, 2 / 5)
    assert metrics.precision_recall(fake, real, k=1) == (2 / 5, 1.0)


def test_precision_recall_identical_and_disjoint_sets():
    x = _feats(7, 200, 8)
    assert metrics.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
    assert metrics.precision_recall(x, x + 1e3, k=3) == (0.0, 0.0)


def test_precision_recall_half_the_modes():
    # 4 far-apart modes, each a 6×6 integer lattice; fakes reproduce exactly 2 modes → precision 1, recall 1/2.
    grid = np.stack(np.meshgrid(np.arange(6.0), np.arange(6.0)), -1).reshape(-1, 2)
    centers = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    real = np.concatenate([grid + c for c in centers])
    fake = np.concatenate([grid + c + 0.25 for c in centers[:2]])
    precision, recall = metrics.precision_recall(real, fake, k=3)
    assert precision == 1.0
    assert recall == 0.5


@pytest.mark.parametrize("k,batch", [(1, 1024), (3, 7), (5, 64)])
def test_precision_recall_matches_brute_force(k, batch):
    rng = np.random.default_rng(k)
    real = rng.normal(size=(300, 16))
    fake = rng.normal(size=(250, 16)) * 1.3 + 0.2
    ours = metrics.precision_recall(real, fake, k=k, batch=batch)
    ref = _brute_pr(real, fake, k)
    assert 0.0 < ref[0] < 1.0 and 0.0 < ref[1] < 1.0  # non-degenerate case
    assert ours == ref
    np.testing.assert_allclose(
        metrics.knn_radii(real, k=k, batch=batch),
        np.sort(np.linalg.norm(real[:, None] - real[None], axis=-1), axis=1)[:, k],
        rtol=1e-10,
    )
    # float32 inputs give the same decisions here (computed in float64 either way).
    assert metrics.precision_recall(real.astype(np.float32), fake.astype(np.float32), k=k, batch=batch) == _brute_pr(
        real.astype(np.float32).astype(np.float64), fake.astype(np.float32).astype(np.float64), k
    )


def test_precision_recall_bad_inputs():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="share D"):
        metrics.precision_recall(x, np.zeros((5, 4)))
    with pytest.raises(ValueError, match="more than k=3"):
        metrics.precision_recall(x[:3], x)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        metrics.precision_recall(x[0], x)


# ----------------------------------------------------------------------------------------------------------------
# Cosine metrics


def _at_angle(theta: float, scale: float = 1.0) -> np.ndarray:
    return scale * np.array([np.cos(theta), np.sin(theta), 0.0])


def test_dreamsim_distance_known_cosines_and_torch():
    e1, e2 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    a = np.stack([e1, e1, e1, 3 * e1, e1])
    b = np.stack([e1, e2, -e1, 0.5 * e1, _at_angle(np.pi / 4, 7.0)])
    np.testing.assert_allclose(metrics.dreamsim_distance(a, b), [0.0, 1.0, 2.0, 0.0, 1 - np.sqrt(0.5)], atol=1e-12)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 32)), rng.normal(size=(20, 32))
    ref = (1 - torch.nn.functional.cosine_similarity(torch.from_numpy(x), torch.from_numpy(y), dim=-1)).numpy()
    np.testing.assert_allclose(metrics.dreamsim_distance(x, y), ref, rtol=1e-10, atol=1e-12)


def test_clip_score_mean_cosine_not_clipped_not_scaled():
    img = np.stack([_at_angle(0.0, 2.0)] * 4)
    # cosines 1, 0, 0.5, -0.5 → mean 0.25 (clipping negatives at 0 would give 0.375; ×100 would give 25).
    txt = np.stack([_at_angle(0.0, 5.0), _at_angle(np.pi / 2), _at_angle(np.pi / 3, 0.1), _at_angle(2 * np.pi / 3)])
    assert metrics.clip_score(img, txt) == pytest.approx(0.25, abs=1e-12)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(16, 8)), rng.normal(size=(16, 8))
    ref = torch.nn.functional.cosine_similarity(torch.from_numpy(x), torch.from_numpy(y), dim=1).mean().item()
    assert metrics.clip_score(x, y) == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError, match="same shape"):
        metrics.clip_score(x, y[:5])


def test_pairwise_mean_distance_known_values():
    eye8 = np.eye(8) * np.arange(1, 9)[:, None]  # 8 orthogonal vectors of different norms: every pair 1
    assert metrics.pairwise_mean_distance(eye8) == pytest.approx(1.0, abs=1e-12)  # incl. i == j would be 0.875
    assert metrics.pairwise_mean_distance(np.ones((8, 5)) * np.arange(1, 9)[:, None]) == pytest.approx(0.0, abs=1e-12)
    e1, e2 = np.eye(3)[0], np.eye(3)[1]
    assert metrics.pairwise_mean_distance(np.stack([e1, e1, e2])) == pytest.approx(2 / 3, abs=1e-12)
    assert metrics.pairwise_mean_distance(np.stack([e1, -e1])) == pytest.approx(2.0, abs=1e-12)
    with pytest.raises(ValueError, match="K >= 2"):
        metrics.pairwise_mean_distance(e1[None])


def test_dreamdiv_averages_per_prompt():
    d = 16
    eye = np.eye(d)
    p_same = np.stack([eye[0] * (i + 1) for i in range(8)])  # all identical directions: 0
    p_orth = eye[:8] * 3.0  # 8 orthogonal: 1
    p_two = np.stack([eye[0]] * 4 + [eye[1]] * 4)  # 12 same-group pairs at 0, 16 cross pairs at 1: 16/28 = 4/7
    emb = np.stack([p_same, p_orth, p_two])
    # mean over prompts: (0 + 1 + 4/7) / 3 = 11/21.
    assert metrics.dreamdiv(emb) == pytest.approx(11 / 21, abs=1e-12)
    p_anti = np.stack([eye[0], -eye[0]] * 4)  # 12 same-sign pairs at 0, 16 opposite pairs at 2: 32/28 = 8/7
    assert metrics.dreamdiv(np.stack([p_orth, p_anti])) == pytest.approx((1 + 8 / 7) / 2, abs=1e-12)
    # Not the distance over all 16 images pooled: cross-prompt pairs would count too.
    pooled = metrics.pairwise_mean_distance(np.concatenate([p_orth, p_anti]))
    assert abs(pooled - (1 + 8 / 7) / 2) > 1e-3
    # Single prompt: equals its pairwise mean distance; random case vs torch cosine over all i < j pairs.
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(5, 8, 12))
    t = torch.from_numpy(emb)
    cos = torch.nn.functional.cosine_similarity
    pairs = [(i, j) for i in range(8) for j in range(i + 1, 8)]
    ref = np.mean([np.mean([1 - cos(t[p, i], t[p, j], dim=0).item() for i, j in pairs]) for p in range(5)])
    assert metrics.dreamdiv(emb) == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError, match=r"\[P, K, D\]"):
        metrics.dreamdiv(emb[0])


def test_rank_deficient_covariances_use_the_symmetric_form():
    """N < D (smoke-test sizes): scipy's sqrtm of the singular product comes out with a large imaginary part and
    clean-fid raises; the trace is still well defined, and we compute it by the symmetric form. Checked against the
    eigenvalues of σ1 σ2 from a general (non-symmetric) eigensolver."""
    rng = np.random.default_rng(0)
    a = 30 * rng.standard_normal((8, 512)) ** 3
    b = 30 * rng.standard_normal((12, 512)) ** 3 + 5
    (mu1, s1), (mu2, s2) = metrics.feature_stats(a), metrics.feature_stats(b)
    with pytest.raises(ValueError, match="Imaginary"):
        cleanfid_fid.frechet_distance(mu1, s1, mu2, s2)
    with pytest.warns(UserWarning, match="rank-deficient"):
        got = metrics.frechet_distance(mu1, s1, mu2, s2)
    ev = np.linalg.eigvals(s1 @ s2)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(ev.real, 0, None)).sum()
    np.testing.assert_allclose(got, ref, rtol=1e-6)
