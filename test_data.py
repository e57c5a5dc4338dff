"""Tests that the tool never writes into a folder it reads as data: caches live in $DDPM_CACHE (the suite's own
temporary one, set in conftest.py), a subfolder with no images is no class, a class list never changes silently
between a run and its resume, and the bundled model's defaults find CIFAR-10 on a fresh clone. CPU only."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from conftest import CIFAR10_CLASSES, TINY, run_main


def images(folder, n, seed=0):
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))


def snapshot(folder):
    """Every file under folder with its bytes: what a command must leave as it found it."""
    files = {}
    for top, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(top, name), "rb") as f:
                files[os.path.relpath(os.path.join(top, name), folder)] = f.read()
    return files


@pytest.mark.parametrize("layout", ["classes", "flat"])
def test_images_in_a_folder_called_data_stay_as_they_are_through_every_command(layout, tmp_path, monkeypatch,
                                                                               capsys, fake_inception):
    monkeypatch.chdir(tmp_path)  # a new user's working folder: their images in ./data, the tool's defaults
    if layout == "classes":
        images("data/disc", 3)
        images("data/bar", 3, seed=1)
    else:
        images("data", 4)
    before = snapshot("data")
    commands = [["train", "--data", "data", "--steps", "2", *TINY],
                ["train", "--resume", "--out", "runs/data", "--steps", "3"],
                ["sample", "--ckpt", "runs/data/ckpt.pt", "--n", "2", "--steps", "1"],
                ["fid", "--samples", "data", "--ref", "data"],
                ["fid", "--ckpt", "runs/data/ckpt.pt", "--n", "4", "--steps", "1"]]  # --ref: the model's data
    for argv in commands:
        code, err = run_main(argv, capsys)
        assert code == 0, (argv, err)
    assert snapshot("data") == before  # the same files, nothing added
    ckpt = torch.load("runs/data/ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["classes"] == (["bar", "disc"] if layout == "classes" else ["data"])
    cache = os.environ["DDPM_CACHE"]
    assert os.listdir(os.path.join(cache, "images")) and os.listdir(os.path.join(cache, "fid"))


def test_caches_of_earlier_releases_inside_a_data_folder_are_no_class(tmp_path):
    images(tmp_path / "classes" / "disc", 2)
    images(tmp_path / "flat", 3)
    for data in ("classes", "flat"):  # what releases before 2026-12-04 wrote into --data-root ./data
        os.makedirs(tmp_path / data / "cache")
        os.makedirs(tmp_path / data / "fid")
        np.save(tmp_path / data / "cache" / "images-0123.npy", np.zeros((2, 3, 16, 16), np.uint8))
        np.savez(tmp_path / data / "fid" / "inception-0123.npz", mu=np.zeros(2))
    x, labels, classes = ddpm.load_images(str(tmp_path / "classes"), image_size=16)
    assert classes == ["disc"] and len(x) == 2
    x, labels, classes = ddpm.load_images(str(tmp_path / "flat"), image_size=16)
    assert classes == ["flat"] and len(x) == 3 and labels.tolist() == [0, 0, 0]


def test_a_resume_on_data_whose_classes_changed_is_refused_naming_the_difference(tmp_path, capsys):
    images(tmp_path / "d" / "disc", 2)
    images(tmp_path / "d" / "bar", 2)
    out = str(tmp_path / "run")
    assert ddpm.main(["train", "--data", str(tmp_path / "d"), "--out", out, "--steps", "1", *TINY]) == 0
    images(tmp_path / "d" / "car", 2)
    os.makedirs(tmp_path / "d" / "notes")  # a folder without images: never a class
    capsys.readouterr()
    code, err = run_main(["train", "--resume", "--out", out, "--steps", "2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "had ['bar', 'disc'] (they differ in ['car'])" in err


class FakeCIFAR10:
    """What torchvision's CIFAR10 gives once downloaded, with the split each call asked for."""
    splits = []

    def __init__(self, root, train, download):
        self.splits.append("train" if train else "test")
        g = torch.Generator().manual_seed(int(train))
        self.data = (torch.rand(4, 32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()
        self.targets, self.classes = [0, 1, 8, 9], list(CIFAR10_CLASSES)


def test_the_bundled_model_scores_on_cifar10_by_default_as_a_model_of_data_cifar10_would(tmp_path, monkeypatch,
                                                                                         capsys, fake_inception):
    import torchvision
    bundled = os.path.join(os.path.dirname(ddpm.__file__), "samples", "cifar10_small.pt")
    assert ddpm.load_checkpoint(bundled)["config"]["data"] == "cifar10"
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    monkeypatch.chdir(tmp_path)
    FakeCIFAR10.splits.clear()
    code, err = run_main(["nll", "--ckpt", bundled, "--n", "2", "--t-samples", "2", "--json"], capsys)
    assert code == 0 and FakeCIFAR10.splits == ["test"], err
    code, err = run_main(["fid", "--ckpt", bundled, "--n", "3", "--steps", "1", "--json"], capsys)
    assert code == 0 and FakeCIFAR10.splits == ["test", "train"], err  # FID: against the training set


def test_caches_live_where_caches_conventionally_live_and_ddpm_cache_moves_them(tmp_path, monkeypatch):
    monkeypatch.delenv("DDPM_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert ddpm.cache_dir("images") == str(tmp_path / "home" / ".cache" / "ddpm" / "images")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ddpm.cache_dir("fid") == str(tmp_path / "xdg" / "ddpm" / "fid")
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "mine"))
    assert ddpm.cache_dir("fid") == str(tmp_path / "mine" / "fid")


def test_a_download_that_fails_is_one_line_and_leaves_no_folder_it_made(tmp_path, monkeypatch, capsys):
    import torchvision

    def offline(root, train, download):  # torchvision makes the root, starts the file, then the network fails
        os.makedirs(root, exist_ok=True)
        open(os.path.join(root, "cifar-10-python.tar.gz"), "wb").close()
        raise OSError("<urlopen error [Errno -2] Name or service not known>")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    root = tmp_path / "new"
    code, err = run_main(["forward", "--data", "cifar10", "--data-root", str(root)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"could not get cifar10 into {root} (<urlopen" in err
    assert not root.exists() and not os.path.exists("outputs/forward_cifar10.png")
