"""Tests for fid.py alone: the Fréchet distance against a closed form and torch-fidelity's own, the statistics, the
.npz format and the cache. Inception itself is stood in for by a small network (conftest.FakeInception)."""
import errno, os

import numpy as np
import pytest
import torch

import fid
from conftest import FakeInception


def test_frechet_distance_against_closed_form_and_an_independent_computation():
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    g = torch.Generator().manual_seed(0)
    q = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]      # Σ = Q diag Qᵀ: they commute
    a, b = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g, dtype=torch.float64)
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    exact = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()      # ‖Δμ‖² + Σ (√a − √b)²
    assert fid.frechet_distance(mu1, q @ a.diag() @ q.T, mu2, q @ b.diag() @ q.T) == pytest.approx(float(exact), 1e-10)
    for n in (200, 20):   # 20 samples of 64 features: Σ of rank 19, as with a small n against 2048 features
        f1 = torch.randn(n, 64, generator=g, dtype=torch.float64)
        f2 = torch.randn(n, 64, generator=g, dtype=torch.float64) + 0.3
        s1, s2 = [dict(mu=f.mean(0).numpy(), sigma=torch.cov(f.T).numpy()) for f in (f1, f2)]
        theirs = fid_statistics_to_metric(s1, s2, False)["frechet_inception_distance"]   # numpy, non-symmetric eig
        assert fid.frechet_distance(s1["mu"], s1["sigma"], s2["mu"], s2["sigma"]) == pytest.approx(theirs, rel=1e-6)
        # itself: 0, to rounding (zero eigenvalues come out ~1e-16 and their square roots ~1e-8: measured 2e-6),
        # and never below 0, so it cannot print as -0.000
        itself = fid.frechet_distance(s1["mu"], s1["sigma"], s1["mu"], s1["sigma"])
        assert 0 <= itself < 1e-7 * s1["sigma"].trace() and f"{itself:.3f}" == "0.000"


def test_inception_stats_are_the_mean_and_unbiased_covariance_of_the_features():
    net, images = FakeInception(), (torch.rand(13, 1, 9, 9) * 255).to(torch.uint8)
    mu, sigma, n = fid.inception_stats(net, images.split(5))                 # grey: repeated into R, G, B
    features = net(images.expand(-1, 3, -1, -1))[0].double()
    assert n == 13 and torch.allclose(mu, features.mean(0)) and torch.allclose(sigma, torch.cov(features.T), atol=1e-12)
    with pytest.raises(fid.FIDError, match="at least 2 images; got 1"):
        fid.inception_stats(net, [images[:1]])


def test_inception_sees_the_same_batches_however_the_images_come():
    """Batches of 3, 4 and 6 regrouped as 5, 5, 3: bit for bit the statistics of those images split(5)."""
    net, images = FakeInception(), (torch.rand(13, 3, 9, 9) * 255).to(torch.uint8)
    assert [len(x) for x in fid.rebatch(images.split([3, 4, 6]), 5)] == [5, 5, 3]
    uneven, even = fid.inception_stats(net, images.split([3, 4, 6]), 5), fid.inception_stats(net, images.split(5), 5)
    assert uneven[2] == even[2] == 13 and torch.equal(uneven[0], even[0]) and torch.equal(uneven[1], even[1])


def test_statistics_files_round_trip_and_other_dimensions_are_named(tmp_path):
    mu, sigma = np.arange(fid.DIMS, dtype=np.float64), np.eye(fid.DIMS)
    fid.save_stats(str(tmp_path / "s.npz"), mu, sigma, 7)
    got = fid.load_stats(str(tmp_path / "s.npz"))
    assert np.array_equal(got[0], mu) and np.array_equal(got[1], sigma) and got[2] == 7
    assert os.listdir(tmp_path) == ["s.npz"]
    np.savez(tmp_path / "no_n.npz", mu=mu, sigma=sigma)  # EDM's files hold mu and sigma only
    assert fid.load_stats(str(tmp_path / "no_n.npz"))[2] is None
    np.savez(tmp_path / "d64.npz", mu=np.zeros(64), sigma=np.eye(64))  # pytorch-fid --dims 64
    with pytest.raises(fid.FIDError, match=r"64-dimensional features \(mu \(64,\), sigma \(64, 64\)\); FID here needs "
                                           r"Inception's 2,048 pool3 features \(pytorch-fid's default, --dims 2048\)"):
        fid.load_stats(str(tmp_path / "d64.npz"))
    for name, content in [("junk.npz", b"not an npz"), ("dir.npz", None)]:
        (tmp_path / name).mkdir() if content is None else (tmp_path / name).write_bytes(content)
        with pytest.raises(fid.FIDError, match="not an .npz with arrays mu and sigma"):
            fid.load_stats(str(tmp_path / name))


def test_a_cache_that_cannot_be_written_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    net, images = FakeInception(), (torch.rand(6, 3, 8, 8) * 255).to(torch.uint8)
    real = np.savez

    def full(file, *a, **k):  # what numpy raises when the disk fills, after part of the file
        with open(file, "wb") as f:
            f.write(b"PK half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "savez", full)
    mu, sigma, n = fid.cached_stats(net, images, str(tmp_path / "cache"))
    err = capsys.readouterr().err
    assert n == 6 and "not cached" in err and "No space left on device" in err and err.count("\n") == 1
    assert os.listdir(tmp_path / "cache") == []                         # no temporary file left behind
    monkeypatch.setattr(np, "savez", real)
    again = fid.cached_stats(net, images, str(tmp_path / "cache"))      # computed anew, now kept
    assert torch.equal(again[0], mu) and len(os.listdir(tmp_path / "cache")) == 1


def test_inception_weights_offline_missing_or_pickled_are_one_line_and_never_run(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def offline(*a, **k):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(tfi, "load_state_dict_from_url", offline)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"w": Evil()}, tmp_path / "evil.pth")
    for path, needle in ((None, "(download): cannot load"), (str(tmp_path / "none.pth"), "no such file"),
                         (str(tmp_path / "evil.pth"), "cannot load them (UnpicklingError)")):
        with pytest.raises(fid.FIDError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            fid.load_inception(path)
    assert not marker.exists()


def test_fid_imports_nothing_of_the_project():
    import ast
    tree = ast.parse(open(fid.__file__).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names <= {"hashlib", "os", "sys", "numpy", "torch", "torch_fidelity", "tqdm"}, names
