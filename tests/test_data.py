"""Tests for ddpm_tool/data.py: image folders and torchvision's data sets decoded as a viewer shows them, in every
mode Pillow opens; the decode cache outside the data; a data folder never written into; one line for what cannot be
read or fetched."""
import glob, os, shutil, struct

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from ddpm_tool import cli, data, runs, sampling
from conftest import CIFAR10_CLASSES, TINY, run_main


def test_mnist_through_torchvision_trains_a_one_channel_model_and_writes_grey_pngs(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"  # the original idx files, as torchvision finds them without downloading
    raw.mkdir(parents=True)
    digits = torch.randint(0, 256, (20, 28, 28), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    for split, n in [("train", 20), ("t10k", 4)]:
        header = struct.pack(">4i", 2051, n, 28, 28)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + digits[:n].numpy().tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">2i", 2049, n) + bytes(i % 10 for i in range(n)))
    images, labels, classes = data.load_images("mnist", str(tmp_path), 28)
    assert images.shape == (20, 1, 28, 28) and torch.equal(images[:, 0], digits)
    assert labels.tolist()[:11] == [*range(10), 0]
    assert classes == [str(d) for d in range(10)]  # "7 - seven" → "7": `sample --class 7` is the digit 7
    out = tmp_path / "run"
    code, err = run_main(["train", "--data", "mnist", "--data-root", str(tmp_path), "--preset", "small", "--steps", "2",
                          "--batch-size", "4", "--image-size", "16", "--out", str(out)], capsys)
    cfg = torch.load(out / "ckpt.pt", weights_only=True)["config"]
    assert code == 0 and "note:" not in err and cfg["channels"] == 1
    assert (cfg["ch"], cfg["ch_mult"], cfg["lr"]) == (32, (1, 2, 2), 1e-3)
    assert cfg["batch_size"] == 4  # a flag beats the preset
    code, err = run_main(["sample", "--ckpt", str(out / "ckpt.pt"), "--class", "7", "--n", "2",
                          "--out", str(tmp_path / "7.png")], capsys)
    grid = Image.open(tmp_path / "7.png")
    assert code == 0 and grid.mode == "L" and grid.size == (35, 18) and "DDIM 25 steps" in err  # the CPU default


def test_fashion_mnist_class_names_work_on_a_command_line(monkeypatch):
    import torchvision
    names = torchvision.datasets.FashionMNIST.classes  # torchvision's own: "T-shirt/top", …, "Ankle boot"
    fake = lambda root, train, download: type("DS", (), dict(data=torch.zeros(2, 28, 28, dtype=torch.uint8),
                                                          targets=[0, 9], classes=names))
    monkeypatch.setattr("torchvision.datasets.FashionMNIST", fake)
    images, labels, classes = data.load_images("fashion-mnist", image_size=32)
    assert images.shape == (2, 1, 32, 32) and classes[0] == "t-shirt" and classes[-1] == "ankle-boot"
    assert all(c.replace("-", "").isalpha() for c in classes)


def test_a_folder_of_grey_images_is_one_channel_and_a_mixed_one_rgb(tmp_path):
    for name, mode in [("a", "L"), ("b", "L"), ("c", "RGB")]:
        (tmp_path / "grey" / "x").mkdir(parents=True, exist_ok=True)
        (tmp_path / "mixed" / "x").mkdir(parents=True, exist_ok=True)
        im = Image.new(mode, (8, 8), 200 if mode == "L" else (200, 10, 10))
        im.save(tmp_path / "mixed" / "x" / f"{name}.png")
        if mode == "L":
            im.save(tmp_path / "grey" / "x" / f"{name}.png")
    grey, _, _ = data.load_images(str(tmp_path / "grey"), image_size=8)
    mixed, _, _ = data.load_images(str(tmp_path / "mixed"), image_size=8)
    assert grey.shape == (2, 1, 8, 8) and (grey == 200).all()
    assert mixed.shape == (3, 3, 8, 8) and (mixed[:2] == 200).all() and mixed[2, :, 0, 0].tolist() == [200, 10, 10]


def test_mixed_image_modes_are_converted(tmp_path):
    for i, mode in enumerate(["L", "RGBA", "P", "RGB", "I;16"]):
        os.makedirs(tmp_path / "c", exist_ok=True)
        Image.new(mode, (20, 12)).save(tmp_path / "c" / f"{i}.png")
    images, labels, classes = data.load_images(str(tmp_path), image_size=8, workers=1)
    assert images.shape == (5, 3, 8, 8) and images.dtype == torch.uint8 and classes == ["c"]


def test_a_folder_is_decoded_once_into_a_cache_keyed_by_what_made_it(folder, tmp_path, monkeypatch):
    shutil.copytree(folder, tmp_path / "imgs")
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "root"))
    imgs, root, opened = str(tmp_path / "imgs"), str(tmp_path / "root"), []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    load = lambda size=16, d=imgs: (data.load_images(d, root, size, 1, cache=True), len(opened))
    (first, labels, classes), n = load()
    cached = glob.glob(os.path.join(root, "images", "images-*.npy"))
    assert n == 6 and len(cached) == 1
    (again, labels2, classes2), n = load()
    assert n == 6 and torch.equal(again, first) and torch.equal(labels2, labels) and classes2 == classes  # mapped
    assert load(8)[1] == 12 and len(glob.glob(os.path.join(root, "images", "*.npy"))) == 2  # another size: its own
    shutil.copytree(imgs, tmp_path / "twin")  # the same files in another folder: its own cache too
    assert load(16, str(tmp_path / "twin"))[1] == 18 and len(glob.glob(os.path.join(root, "images", "*.npy"))) == 3
    some = os.path.join(imgs, "cat", sorted(os.listdir(os.path.join(imgs, "cat")))[0])
    os.utime(some, ns=(1, 1))  # a file changed (its time): decoded anew
    assert load()[1] == 24 and len(glob.glob(os.path.join(root, "images", "*.npy"))) == 4
    with open(cached[0], "r+b") as f:  # a damaged cache: decoded anew and rewritten whole, never half-read
        f.truncate(os.path.getsize(cached[0]) // 2)
    shutil.rmtree(tmp_path / "imgs")
    shutil.copytree(folder, tmp_path / "imgs")  # the first files again (copytree keeps their times): the first key
    opened.clear()
    (x, _, _), n = load()
    assert torch.equal(x, first) and n == 6 and os.path.getsize(cached[0]) > x.numel()
    assert torch.equal(load()[0][0], first) and len(opened) == 6  # whole again: mapped, not decoded


def test_pick_decodes_only_the_chosen_images(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "d")
    full, labels, classes = data.load_images(str(tmp_path / "d"), image_size=16)
    (tmp_path / "d" / "cat" / "0.jpg").write_bytes(b"not a picture")   # file 0 in sorted order: never opened
    picked, picked_labels, picked_classes = data.load_images(str(tmp_path / "d"), image_size=16,
                                                             pick=lambda n: torch.tensor([5, 1, 3]) % n)
    assert torch.equal(picked, full[[5, 1, 3]]) and torch.equal(picked_labels, labels[[5, 1, 3]])
    assert picked_classes == classes == ["cat", "ship"]


def test_cifar10_path_converts_torchvision_data(monkeypatch):
    import numpy as np
    import torchvision

    class FakeCIFAR10:  # what torchvision.datasets.CIFAR10 exposes once downloaded: HWC uint8, int targets
        def __init__(self, root, train, download):
            assert train and download and root == "somewhere"
            self.data = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
            self.targets, self.classes = [8, 0], list(CIFAR10_CLASSES)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    images, labels, classes = data.load_images("cifar10", "somewhere", 32)
    assert images.shape == (2, 3, 32, 32)
    assert torch.equal(images[1, 2], torch.from_numpy(FakeCIFAR10("somewhere", 1, 1).data[1, :, :, 2]))
    assert labels.tolist() == [8, 0] and classes[8] == "ship"
    assert data.load_images("cifar10", "somewhere", 16)[0].shape == (2, 3, 16, 16)
    picked, labels, _ = data.load_images("cifar10", "somewhere", 32, pick=lambda n: torch.tensor([1]))
    assert torch.equal(picked, images[1:]) and labels.tolist() == [0]
    # A folder copy of CIFAR-10 sorts its class folders alphabetically: the same indices as torchvision's labels.
    assert list(CIFAR10_CLASSES) == sorted(CIFAR10_CLASSES)


def test_a_decode_cache_that_cannot_be_written_never_stops_a_run(folder, tmp_path, monkeypatch, capsys):
    def full(f, array, *a, **k):  # what numpy raises when the disk fills: an OSError without errno, after part of it
        f.write(b"\x93NUMPY part")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 0))
        raise OSError("12288 requested and 3968 written")
    monkeypatch.setattr(np, "save", full)
    root, out = tmp_path / "root", tmp_path / "run"
    monkeypatch.setenv("DDPM_CACHE", str(root))
    code, err = run_main(["train", "--data", folder, "--out", str(out), "--steps", "2", *TINY], capsys)
    assert code == 0 and err.count("note: the decoded images are not cached in") == 1, err
    assert "(No space left on device); they are decoded again next time" in err and os.listdir(root / "images") == []
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_images_are_resized_to_cover_the_size_and_centre_cropped_never_stretched():
    image = Image.fromarray(np.arange(40 * 80 * 3, dtype=np.uint8).reshape(40, 80, 3))
    assert data.resize_crop(image, (16, 32)).size == (32, 16)                   # the same aspect: resized only
    square = data.resize_crop(image, 16)                                         # the short side to 16, then cropped
    assert square.size == (16, 16)
    reference = data.resize_crop(image, (16, 32)).crop((8, 0, 24, 16))         # the centre of the 16×32 one
    assert np.array_equal(np.asarray(square), np.asarray(reference))
    tall = data.resize_crop(image, (32, 16))                                    # another aspect: covered, cropped
    assert tall.size == (16, 32)
    batch = torch.zeros(2, 3, 28, 28)
    assert data.resize_crop(batch, (16, 32)).shape == (2, 3, 16, 32)


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
    for kind in ("classes", "flat"):  # what releases before 2026-12-04 wrote into --data-root ./data
        os.makedirs(tmp_path / kind / "cache")
        os.makedirs(tmp_path / kind / "fid")
        np.save(tmp_path / kind / "cache" / "images-0123.npy", np.zeros((2, 3, 16, 16), np.uint8))
        np.savez(tmp_path / kind / "fid" / "inception-0123.npz", mu=np.zeros(2))
    x, labels, classes = data.load_images(str(tmp_path / "classes"), image_size=16)
    assert classes == ["disc"] and len(x) == 2
    x, labels, classes = data.load_images(str(tmp_path / "flat"), image_size=16)
    assert classes == ["flat"] and len(x) == 3 and labels.tolist() == [0, 0, 0]


def test_a_resume_on_data_whose_classes_changed_is_refused_naming_the_difference(tmp_path, capsys):
    images(tmp_path / "d" / "disc", 2)
    images(tmp_path / "d" / "bar", 2)
    out = str(tmp_path / "run")
    assert cli.main(["train", "--data", str(tmp_path / "d"), "--out", out, "--steps", "1", *TINY]) == 0
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
    assert sampling.load_checkpoint(bundled)["config"]["data"] == "cifar10"
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
    assert runs.cache_dir("images") == str(tmp_path / "home" / ".cache" / "ddpm" / "images")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runs.cache_dir("fid") == str(tmp_path / "xdg" / "ddpm" / "fid")
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "mine"))
    assert runs.cache_dir("fid") == str(tmp_path / "mine" / "fid")


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


def test_every_mode_pillow_opens_decodes_as_a_viewer_shows_it_and_what_cannot_is_one_line(tmp_path, capsys):
    """16-bit grey scaled to 8 bits (it decoded as white, convert("L") clipping at 255), transparency over white,
    CMYK and palettes as Pillow shows them; 32-bit floats and integers past 16 bits refused by name."""
    def uniform(mode, value, size=(4, 4)):
        return Image.new(mode, size, value)
    cases = {  # name: (image, the 8-bit value a viewer shows, grey?)
        "i16.png": (uniform("I;16", 32768), 128, True), "i16_white.png": (uniform("I;16", 65535), 255, True),
        "i32.tif": (uniform("I", 1000), round(1000 * 255 / 65535), True), "bits.png": (uniform("1", 1), 255, True),
        "la_clear.png": (uniform("LA", (0, 0)), 255, True), "la.png": (uniform("LA", (100, 255)), 100, True),
        "rgba_clear.png": (uniform("RGBA", (0, 0, 0, 0)), (255, 255, 255), False),
        "cmyk.jpg": (uniform("CMYK", (0, 255, 255, 0)), None, False)}
    palette = uniform("P", 0)
    palette.putpalette([10, 20, 30] * 256)
    palette.info["transparency"] = 0
    cases["p_clear.png"] = (palette, (255, 255, 255), False)
    for name, (image, expected, grey) in cases.items():
        path = tmp_path / name
        image.save(path, **({"transparency": 0} if name == "p_clear.png" else {}))
        x = data.decode_images([str(path)], 4, 1)[0]
        assert x.shape[0] == (1 if grey else 3), name
        if expected is None:  # CMYK: as Pillow converts it
            expected = tuple(Image.open(path).convert("RGB").getpixel((0, 0)))
        want = torch.tensor(expected if isinstance(expected, tuple) else (expected,), dtype=torch.uint8)
        assert torch.equal(x[:, 0, 0], want) and (x == x[:, :1, :1]).all(), (name, x[:, 0, 0], want)
    uniform("F", 0.5).save(tmp_path / "float.tif")
    uniform("I", 70000).save(tmp_path / "big.tif")
    for name in ("float.tif", "big.tif"):
        with pytest.raises(runs.UserError, match=rf"cannot read image .*{name} \(mode [FI]: no range to show it"):
            data.decode_images([str(tmp_path / name)], 4, 1)


def test_every_broken_image_of_a_folder_is_named_in_one_line(tmp_path):
    os.makedirs(tmp_path / "d" / "c")
    for i in range(5):
        (tmp_path / "d" / "c" / f"{i}.png").write_bytes(b"\x89PNG broken")
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "c" / "good.png")
    with pytest.raises(runs.UserError) as e:
        data.load_images(str(tmp_path / "d"), image_size=8)
    message = str(e.value)
    assert message.startswith("cannot read 5 images: ") and message.count("(UnidentifiedImageError)") == 3
    assert message.endswith(", …; fix or remove them") and "\n" not in message


def test_a_data_set_that_cannot_be_had_offline_names_data_root_and_the_layout(tmp_path, monkeypatch, capsys):
    def offline(root, *a, **k):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://…\n<urlopen error>")
    monkeypatch.setattr("torchvision.datasets.MNIST", offline)
    code, err = run_main(["train", "--data", "mnist", "--data-root", str(tmp_path / "empty"), "--out",
                          str(tmp_path / "run"), *TINY], capsys)
    assert code == 2 and err.count("\n") == 1 and "pass --data-root a folder holding a copy" in err
    assert "(MNIST/raw/)" in err and "Error downloading train-images-idx3-ubyte.gz:)" in err
