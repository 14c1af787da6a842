"""Tests for sims.metrics: statistics, Fréchet distance, KID, precision/recall, feature extractors."""
from __future__ import annotations

import socket
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from sims.metrics import (
    DigitsFeatures,
    FeatureStats,
    IdentityFeatures,
    InceptionFeatures,
    build_feature_extractor,
    check_feature_dim,
    compute_stats,
    frechet_distance,
    judge_digits,
    kernel_inception_distance,
    load_digits_classifier,
    load_npz,
    precision_recall,
    save_npz,
)


def _random_gaussian_stats(rng, d, n):
    a = rng.standard_normal((d, d)) / np.sqrt(d)
    x = rng.standard_normal((n, d)) @ a.T + rng.standard_normal(d)
    return x.mean(0), np.cov(x, rowvar=False)


def _scipy_reference_fd(mu1, s1, mu2, s2):
    """Independent reference: the usual sqrtm-of-the-product formula (pytorch-fid / EDM style)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ------------------------------------------------------------------------------- Fréchet distance
@pytest.mark.parametrize("d", [4, 32, 128])
def test_frechet_matches_scipy_reference(d):
    rng = np.random.default_rng(d)
    mu1, s1 = _random_gaussian_stats(rng, d, 4 * d + 50)
    mu2, s2 = _random_gaussian_stats(rng, d, 4 * d + 50)
    ref = _scipy_reference_fd(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert ref > 0.1
    assert abs(got - ref) / ref <= 1e-6
    # torch inputs give the same number
    got_t = frechet_distance(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2)))
    assert got_t == pytest.approx(got, rel=1e-12)


def test_frechet_closed_form_1d_and_diagonal():
    # 1-D: FD = (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)
    # commuting (diagonal) covariances: sum of (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expect = float(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    assert frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(expect, rel=1e-12)


def test_frechet_self_is_zero_even_when_singular():
    rng = np.random.default_rng(0)
    mu, s = _random_gaussian_stats(rng, 64, 500)
    assert frechet_distance(mu, s, mu, s) < 1e-8 * np.trace(s)
    mu_sing, s_sing = _random_gaussian_stats(rng, 64, 20)  # rank 19 < D: sqrtm would be complex noise
    fd = frechet_distance(mu_sing, s_sing, mu_sing, s_sing)
    assert 0.0 <= fd < 1e-7 * np.trace(s_sing)


def test_frechet_dimension_mismatch_is_clear():
    with pytest.raises(ValueError, match=r"D=2048 vs D=64"):
        frechet_distance(np.zeros(2048), np.eye(2048), np.zeros(64), np.eye(64))
    with pytest.raises(ValueError, match=r"have D=2048 features but the extractor gives D=64"):
        check_feature_dim(np.zeros(2048), 64)
    with pytest.raises(ValueError, match="sigma"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


# ------------------------------------------------------------------------------- FeatureStats / npz
def test_stats_chunks_equal_one_shot_unbiased():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1003, 7)) * 3.0 + 10.0
    one = FeatureStats().update(x)
    chunked = FeatureStats(dim=7)
    for part in np.array_split(x, [1, 50, 51, 600]):  # includes a 0-row and a 1-row chunk
        chunked.update(torch.from_numpy(part).float() if part.shape[0] % 2 else part)
    # the float32 chunks lose precision, so compare against float64 one-shot loosely, and exactly below
    mu, sigma = one.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False, ddof=1), rtol=1e-9, atol=1e-10)
    mu_c, sigma_c = chunked.mean_cov()
    np.testing.assert_allclose(mu_c, mu, rtol=1e-6)
    np.testing.assert_allclose(sigma_c, sigma, rtol=1e-4, atol=1e-5)
    # merge of float64 shards is exact up to summation order
    a, b = FeatureStats(max_items=600).update(x[:400]), FeatureStats(max_items=600).update(x[400:])
    a.merge(b)
    assert a.count == 1003
    np.testing.assert_allclose(a.mean_cov()[1], sigma, rtol=1e-10, atol=1e-12)
    kept = a.features()
    assert kept.shape == (600, 7)
    np.testing.assert_allclose(kept.numpy(), x[:600], rtol=1e-6)


def test_stats_errors():
    s = FeatureStats(dim=4)
    with pytest.raises(ValueError, match="D=5"):
        s.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        s.update(np.full((2, 4), np.nan))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats(dim=4).update(np.zeros((1, 4))).mean_cov()


def test_npz_round_trip_and_edm_format(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 16))
    stats = FeatureStats().update(x)
    path = tmp_path / "ref.stats"  # no .npz suffix: must be written exactly there
    stats.save_npz(path)
    assert path.is_file() and not (tmp_path / "ref.stats.npz").exists()
    mu, sigma = load_npz(path)
    mu0, sigma0 = stats.mean_cov()
    np.testing.assert_array_equal(mu, mu0)
    np.testing.assert_array_equal(sigma, sigma0)
    # an EDM-style file written by plain numpy with extra keys loads too
    edm = tmp_path / "edm.npz"
    np.savez(edm, mu=mu0.astype(np.float32), sigma=sigma0, extra=np.arange(3))
    mu1, sigma1 = load_npz(edm)
    assert mu1.dtype == np.float64 and sigma1.shape == (16, 16)
    assert frechet_distance(mu1, sigma1, mu0, sigma0) < 1e-6
    # save_npz with extra keys
    save_npz(tmp_path / "b.npz", mu0, sigma0, count=np.array(200))
    with np.load(tmp_path / "b.npz") as f:
        assert set(f.keys()) == {"mu", "sigma", "count"}


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference statistics not found"):
        load_npz(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3), cov=np.eye(3))
    with pytest.raises(ValueError, match=r"missing \['sigma'\].*keys found"):
        load_npz(bad)
    mismatched = tmp_path / "mismatch.npz"
    np.savez(mismatched, mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"\[3, 3\]"):
        load_npz(mismatched)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        load_npz(junk)


# ------------------------------------------------------------------------------- KID, precision/recall
def test_kid_zero_for_same_distribution_positive_for_shift():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((600, 16)), rng.standard_normal((600, 16))
    mean, std = kernel_inception_distance(a, b, num_subsets=20, subset_size=300)
    assert abs(mean) < 3 * std + 1e-3
    shifted = rng.standard_normal((600, 16)) + 0.5
    mean_s, std_s = kernel_inception_distance(a, shifted, num_subsets=20, subset_size=300)
    assert mean_s > 10 * max(abs(mean), std) and mean_s > 0.05
    # reproducible for a fixed seed
    assert kernel_inception_distance(a, b, num_subsets=5, subset_size=100) == kernel_inception_distance(
        a, b, num_subsets=5, subset_size=100
    )


def test_kid_small_case_matches_explicit_formula():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 3)) + 1.0
    k = lambda a, b: (a @ b.T / 3 + 1) ** 3  # noqa: E731
    m = 5
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    expect = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2
    # with subset_size = N every subset is a permutation of all rows: MMD² is permutation invariant
    mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=5)
    assert mean == pytest.approx(expect, rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_precision_recall_same_and_shifted():
    rng = np.random.default_rng(5)
    real = rng.standard_normal((800, 8))
    fake = rng.standard_normal((800, 8))
    pr = precision_recall(real, fake, k=5, batch_size=256)
    assert pr["precision"] > 0.9 and pr["recall"] > 0.9
    shifted = rng.standard_normal((800, 8)) + 2.0
    pr_s = precision_recall(real, shifted, k=5)
    assert pr_s["precision"] < pr["precision"] - 0.3
    # mode dropping (2-D, where k-NN balls are tight): fake covering half the real space keeps
    # precision and loses recall
    real2, fake2 = rng.standard_normal((800, 2)), rng.standard_normal((800, 2))
    pr_h = precision_recall(real2, fake2[fake2[:, 0] > 0], k=5)
    assert pr_h["precision"] > 0.9 and pr_h["recall"] < 0.7
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(real[:5], fake, k=5)


# ------------------------------------------------------------------------------- feature extractors
def test_identity_and_factory():
    ext = build_feature_extractor("identity", data_dim=2)
    assert isinstance(ext, IdentityFeatures) and ext.feature_dim == 2
    assert ext(torch.ones(3, 2)).shape == (3, 2)
    with pytest.raises(ValueError, match="2"):
        ext(torch.ones(3, 3))
    with pytest.raises(ValueError, match="data_dim"):
        build_feature_extractor("identity")
    with pytest.raises(ValueError, match="unknown feature extractor 'lenet'.*identity, digits, inception"):
        build_feature_extractor("lenet")


def test_compute_stats_from_loader_batches():
    x = torch.randn(50, 2)
    batches = [(x[i : i + 16], torch.zeros(len(x[i : i + 16]))) for i in range(0, 50, 16)]
    stats = compute_stats(IdentityFeatures(2), batches, max_items=10)
    mu, sigma = stats.mean_cov()
    np.testing.assert_allclose(mu, x.double().mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(x.double().numpy(), rowvar=False), rtol=1e-6)
    assert stats.features().shape == (10, 2)


@pytest.fixture(scope="module")
def digits_split():
    from sims.metrics.train_digits_features import digits_split as split

    return split()


def test_digits_features_offline_accuracy_and_shapes(digits_split, monkeypatch):
    # no network: any attempt to download would fail loudly
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
    _, _, x_te, y_te = digits_split
    clf = load_digits_classifier()
    acc = float((clf(x_te).argmax(1) == y_te).float().mean())
    assert acc >= 0.95
    ext = build_feature_extractor("digits")
    assert isinstance(ext, DigitsFeatures) and ext.feature_dim == 128
    f8 = ext(x_te)
    assert f8.shape == (x_te.shape[0], 128) and (f8 >= 0).all()
    # 16x16 (nearest-upsampled) and flattened inputs give the same features
    x16 = x_te.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(ext(x16), f8)
    torch.testing.assert_close(ext(x_te.reshape(-1, 64)), f8)
    torch.testing.assert_close(ext(x16.repeat(1, 3, 1, 1)), f8)  # gray repeated to RGB (data.channels=3)
    # a parent's .train() cannot switch the extractor out of eval mode
    assert ext.train().training is False
    with pytest.raises(ValueError, match=r"\[N, 1 or 3, 8, 8\].*got shape \(2, 1, 28, 28\)"):
        ext(torch.zeros(2, 1, 28, 28))


def test_shipped_digits_weights_match_their_record():
    import hashlib

    from sims.metrics.features import DIGITS_INFO, DIGITS_WEIGHTS, load_digits_info

    info = load_digits_info()
    assert hashlib.sha256(DIGITS_WEIGHTS.read_bytes()).hexdigest() == info["weights_sha256"]
    assert info["test_accuracy"] >= 0.97 and info["num_test"] >= 400
    assert DIGITS_WEIGHTS.stat().st_size < 1_000_000 and DIGITS_INFO.is_file()


def test_digits_features_separate_real_from_corrupted(digits_split):
    x_tr, y_tr, x_te, _ = digits_split
    ext = DigitsFeatures()
    real = compute_stats(ext, [x_tr])
    test = compute_stats(ext, [x_te])
    noisy = compute_stats(ext, [(x_te + 0.5 * torch.randn_like(x_te)).clamp(-1, 1)])
    fd_test = frechet_distance(*real.mean_cov(), *test.mean_cov())
    fd_noisy = frechet_distance(*real.mean_cov(), *noisy.mean_cov())
    assert fd_noisy > 5 * fd_test
    judged = judge_digits(x_te)
    assert judged["num_samples"] == x_te.shape[0]
    assert sum(judged["class_share"]) == pytest.approx(1.0)
    assert max(abs(s - 0.1) for s in judged["class_share"]) < 0.02
    assert judged["confident_fraction"] > 0.9


def test_inception_errors_without_weights(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"never downloaded: set sims.inception_weights=PATH to pt_inception-2015-12-05-6726825d.pth"):
        build_feature_extractor("inception")
    with pytest.raises(FileNotFoundError, match="no file at"):
        InceptionFeatures(tmp_path / "missing.pth")
    fake = tmp_path / "w.pth"
    fake.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(ImportError, match=r"sims\[fid\]"):
        InceptionFeatures(fake)


def test_inception_features_via_torch_fidelity(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")  # skips when torch-fidelity is not installed
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as tf
    except Exception as exc:  # e.g. a torchvision build that does not match torch (RuntimeError)
        pytest.skip(f"torch-fidelity cannot import here: {type(exc).__name__}: {exc}")
    # random-initialised network (the real weights are never downloaded in tests)
    monkeypatch.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
    monkeypatch.setattr(tf.torch, "load", lambda *a, **k: {})
    w = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    w.write_bytes(b"")
    ext = InceptionFeatures(w)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    u8 = InceptionFeatures.to_uint8(x)
    assert u8.dtype == torch.uint8 and u8.shape == (2, 3, 8, 8)
    assert int(u8[0, 0, 0, 0]) == int(np.clip(np.round(127.5 * float(x[0, 0, 0, 0]) + 127.5), 0, 255))
    f = ext(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float32


# ------------------------------------------------------------------------------- distributed (gloo)
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, x, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        shard = x[:300] if rank == 0 else x[300:]  # unequal shards
        stats = FeatureStats(dim=x.shape[1], max_items=500)
        for chunk in torch.split(shard, 64):
            stats.update(chunk)
        from sims.dist import DistContext

        ctx = DistContext(rank=rank, world_size=world)
        stats.all_reduce(ctx)
        mu, sigma = stats.mean_cov()
        # a rank that saw no features at all (dim known from construction) takes part as well
        lonely = FeatureStats(dim=x.shape[1])
        if rank == 0:
            lonely.update(x)
        lonely.all_reduce(ctx)
        np.savez(f"{out_dir}/rank{rank}.npz", mu=mu, sigma=sigma, count=stats.count, kept=stats.features().numpy(),
                 lonely_mu=lonely.mean_cov()[0], lonely_count=lonely.count)
    finally:
        dist.destroy_process_group()


def test_all_reduce_two_gloo_processes_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    x = torch.from_numpy(np.random.default_rng(6).standard_normal((701, 5)))
    mp.spawn(_dist_worker, args=(2, _free_port(), x, str(tmp_path)), nprocs=2, join=True)
    mu, sigma = FeatureStats().update(x).mean_cov()
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as f:
            assert int(f["count"]) == 701
            np.testing.assert_allclose(f["mu"], mu, rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(f["sigma"], sigma, rtol=1e-10, atol=1e-13)
            # kept raw features: rank 0's 300 then the first 200 of rank 1's
            np.testing.assert_allclose(f["kept"], x[:500].numpy(), rtol=1e-6)
            assert int(f["lonely_count"]) == 701
            np.testing.assert_allclose(f["lonely_mu"], mu, rtol=1e-12, atol=1e-14)


def test_the_package_exports_every_public_name_of_its_submodules():
    import sims.metrics as metrics
    from sims.metrics import features, frechet, stats

    expected = [*stats.__all__, *frechet.__all__, *features.__all__]
    assert metrics.__all__ == expected and len(set(expected)) == len(expected)
    for name in expected:  # each listed name is bound in the package to its submodule's object
        module = next(m for m in (stats, frechet, features) if name in m.__all__)
        assert getattr(metrics, name) is getattr(module, name), name
