"""Tests for ddpm_tool/fid.py: FID against closed forms and torch-fidelity's own, the statistics, their .npz format
and cache; and `fid` of a checkpoint or a folder, with its one-line refusals. Inception itself is stood in for by a
small network (conftest.FakeInception) where a test is about the plumbing."""
import builtins, errno, glob, json, os, shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_tool import cli, fid, sampling
from conftest import FakeInception, grey_run, run_main


def test_fid_of_a_checkpoint_equals_fid_of_its_samples_written_as_pngs(ckpts, folder, tmp_path, capsys, fake_inception,
                                                                        monkeypatch):
    args = ["--ref", folder, "--data-root", str(tmp_path / "root"), "--json"]
    drawn = ["--n", "56", "--steps", "3", "--batch-size", "8"]  # Inception's batches of 50 are not the sampler's
    assert cli.main(["sample", "--ckpt", ckpts["cond"], *drawn, "--out", str(tmp_path / "s") + "/"]) == 0
    capsys.readouterr()
    real_round = builtins.round
    monkeypatch.setattr(builtins, "round", lambda x, *digits: x if digits else real_round(x))  # all the JSON's digits
    assert cli.main(["fid", "--ckpt", ckpts["cond"], *drawn, *args]) == 0
    sampled = json.loads(capsys.readouterr().out)
    assert cli.main(["fid", "--samples", str(tmp_path / "s"), *args]) == 0
    written = json.loads(capsys.readouterr().out)
    assert sampled["fid"] == written["fid"] > 0 and sampled["n"] == written["n"] == 56 and sampled["ref_n"] == 6
    assert sampled["sampler"] == "DDIM 3 steps, eta 0.0" and sampled["guidance"] == 2.0 and sampled["seed"] == 0
    assert cli.main(["fid", "--samples", folder, *args]) == 0                   # a set against itself
    assert abs(json.loads(capsys.readouterr().out)["fid"]) < 1e-6


def test_reference_statistics_of_a_folder_are_cached_by_what_made_them(folder, tmp_path, monkeypatch):
    shutil.copytree(folder, tmp_path / "d")
    computed, real = [], fid.inception_stats
    monkeypatch.setattr(fid, "inception_stats", lambda *a: computed.append(1) or real(*a))
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "root"))
    net, root = FakeInception(), str(tmp_path / "downloads")
    stats = lambda size=16, network=net, **k: sampling.fid_reference(network, str(tmp_path / "d"), root, size, **k)
    first, again = stats(), stats()
    assert len(computed) == 1 and all(torch.equal(x, y) for x, y in zip(first[:2], again[:2])) and first[2] == 6
    with pytest.raises(fid.FIDError, match="R = G = B"):                       # RGB images for grey samples
        stats(channels=1)
    Image.new("RGB", (16, 16), "red").save(tmp_path / "d" / "cat" / "1.png")     # the folder changed: computed anew
    changed = stats()
    assert len(computed) == 2 and not torch.equal(changed[0], first[0])
    stats(8)                                                                     # another size, another network
    stats(network=FakeInception(seed=1))
    assert len(computed) == 4 and len(os.listdir(tmp_path / "root" / "fid")) == 4 and not os.path.exists(root)
    for path in glob.glob(str(tmp_path / "root" / "fid" / "*.npz")):  # a file whose key is not ours: never used
        with np.load(path) as f:
            np.savez(path, **{**f, "key": "someone else's"})
    stats()
    assert len(computed) == 5
    for path in glob.glob(str(tmp_path / "root" / "fid" / "*.npz")):           # a truncated file: computed anew
        with open(path, "r+b") as f:
            f.truncate(100)
    again = stats()
    assert len(computed) == 6 and torch.equal(again[0], changed[0])


def test_missing_inception_weights_name_the_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("DDPM_INCEPTION", raising=False)
    with pytest.raises(fid.FIDError, match=r"no such file; offline, pass --inception PATH .*DDPM_INCEPTION"):
        sampling.inception(str(tmp_path / "none.pth"), torch.device("cpu"))


def test_fid_bad_inputs_are_one_line(ckpts, folder, tmp_path, capsys, monkeypatch, fake_inception):
    os.makedirs(tmp_path / "empty" / "c")
    os.makedirs(tmp_path / "one" / "c")
    Image.new("RGB", (16, 16)).save(tmp_path / "one" / "c" / "0.png")
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(3))
    np.savez(tmp_path / "d64.npz", mu=np.zeros(64), sigma=np.eye(64))
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    grey_run(tmp_path)
    capsys.readouterr()
    cases = {
        "no --ref for a folder": (["fid", "--samples", folder], "--ref: which images to compare with?", 2),
        "no images": (["fid", "--samples", str(tmp_path / "empty"), "--ref", folder], "--samples", 2),
        "empty ref": (["fid", "--samples", folder, "--ref", str(tmp_path / "empty")], "--ref", 2),
        "npz without mu": (["fid", "--samples", folder, "--ref", str(tmp_path / "nomu.npz")], "mu and sigma", 2),
        "not an npz": (["fid", "--samples", folder, "--ref", str(tmp_path / "junk.npz")], "mu and sigma", 2),
        "grey against RGB": (["fid", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--ref", folder], "R = G = B", 2),
        "n = 1": (["fid", "--samples", folder, "--ref", folder, "--n", "1"], "--n", 2),
        "n over the folder": (["fid", "--samples", folder, "--ref", folder, "--n", "7"],
                              "--n 7: the data has only 6 images", 2),
        "ref-n over the folder": (["fid", "--samples", folder, "--ref", folder, "--ref-n", "7"],
                                  "--ref-n 7: the data has only 6 images", 2),
        "one image": (["fid", "--samples", str(tmp_path / "one"), "--ref", folder], "at least 2 images", 2),
        "pytorch-fid --dims 64": (["fid", "--samples", folder, "--ref", str(tmp_path / "d64.npz")],
                                  "holds statistics of 64-dimensional features", 2),
    }
    for name, (argv, needle, want) in cases.items():
        code, err = run_main([*argv, "--data-root", str(tmp_path / "root")], capsys)
        assert code == want and needle in err and err.count("\n") == 1 and "Traceback" not in err, (name, err)


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
