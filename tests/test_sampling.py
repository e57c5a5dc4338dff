"""Tests for ddpm_tool/sampling.py: the bundled model, the batched loop, the reverse and forward processes, writing
samples, and the editing commands (`inpaint`, `interpolate`, `img2img`) with their one-line refusals."""
import errno, os, shutil

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from ddpm_tool import data, runs, sampling, trainer
from conftest import CIFAR10_CLASSES, HERE, TINY, Oracle, grey_run, randomize, run_main


def test_the_bundled_model_loads_weights_only_and_samples_its_classes(tmp_path, monkeypatch, capsys):
    path = os.path.join(HERE, "samples", "cifar10_small.pt")
    assert os.path.getsize(path) <= 25 * 10 ** 6
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and values only
    assert ckpt["classes"] == list(CIFAR10_CLASSES) and ckpt["step"] > 0
    assert {v.dtype for v in ckpt["ema"]["model"].values()} == {torch.float16}
    run = sampling.load_run(path, "cpu")
    assert sum(p.numel() for p in run.model.parameters()) == 8_954_883 and not run.cfg["unconditional"]
    x = run.diffusion.sample(run.model, 2, torch.tensor([8, 8]), guidance=2.0, steps=3,
                             generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and x.isfinite().all() and x.abs().max() <= 1 and x.std() > 0.2
    monkeypatch.chdir(tmp_path)  # no runs/ here: `sample` falls back to the bundled model and says so
    code, err = run_main(["sample", "--class", "ship", "--n", "2", "--steps", "2", "--out", "ship.png"], capsys)
    assert code == 0 and "bundled" in err and "DDIM 2 steps" in err and Image.open("ship.png").size == (67, 34)


def test_padded_batches_yield_exactly_n_samples():
    model = randomize(ddpm.UNet(3, 16, (1,), 1, (), 0.0, 8, num_classes=3))
    labels = torch.tensor([0, 1, 2, 0, 1])
    for pad in (False, True):
        batches = list(sampling.sample_batches(model, ddpm.Diffusion(20), 5, 2, pad, y=labels, steps=3))
        assert [len(b) for b in batches] == [2, 2, 1] and all(b.shape[1:] == (3, 8, 8) for b in batches)


def test_the_batched_loop_slices_per_image_tensors_also_in_a_tuple_and_pads_the_last_batch():
    """sample_batches: noise and inpainting's (x_known, mask) are sliced along the batches, the last one padded (a
    compiled model's one shape): sliced noise gives one batch's samples, a sliced mask each row's own known pixels."""
    model = randomize(ddpm.UNet(3, 16, (1,), 1, (), 0.0, 8, num_classes=3))
    d = ddpm.Diffusion(20)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(5, 3, 8, 8, generator=g)
    x_known = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1
    mask = (torch.rand(5, 1, 8, 8, generator=g) > 0.5).float().expand(5, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1])
    whole = d.sample(model, 5, y, 2.0, steps=4, noise=noise)  # DDIM, η = 0: a function of the noise
    for pad in (False, True):
        batches = list(sampling.sample_batches(model, d, 5, 2, pad, y=y, guidance=2.0, steps=4, noise=noise))
        assert [len(b) for b in batches] == [2, 2, 1] and torch.allclose(torch.cat(batches), whole, atol=1e-5)
        x = torch.cat(list(sampling.sample_batches(model, d, 5, 2, pad, y=y, guidance=2.0, steps=4, noise=noise,
                                               known=(x_known, mask))))  # each batch pastes its own rows
        assert torch.equal(x[mask > 0], x_known[mask > 0]) and not torch.allclose(x, whole, atol=1e-3)


# ---------------------------------------------------------------------------------------------- pictures of the process
@pytest.mark.parametrize("steps,expected_t", [(None, [99, 88, 77, 66, 55, 44, 33, 22, 11, 0]),   # 100 steps, every 11th
                                              (12, [99, 90, 81, 63, 54, 45, 36, 18, 9, 0])])    # 10 of DDIM's 12
def test_reverse_process_frames_run_from_the_start_noise_to_the_returned_sample(steps, expected_t):
    d, x_star = ddpm.Diffusion(100), torch.rand(1, 3, 8, 8) * 2 - 1
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x, frames = sampling.reverse_process(Oracle(d, x_star), d, 2, steps=steps, noise=noise,
                                     generator=torch.Generator().manual_seed(1))
    assert [t for t, _, _ in frames] == expected_t
    assert torch.equal(frames[0][1], noise) and torch.equal(frames[-1][2], x)   # x_{T−1} … the sample itself
    for t, x_t, x0 in frames:  # the oracle's data is the one point x*: every x̂_0 is x*, from any x_t
        assert torch.allclose(x0, x_star.expand_as(x0), atol=1e-3), t


def test_forward_process_rows_follow_eq_4_with_one_eps_a_row():
    x0 = torch.linspace(-1, 1, 2 * 3 * 16 * 16).view(2, 3, 16, 16)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    rows, ts = sampling.forward_process(x0, noise, [ddpm.Diffusion(1000, "linear"), ddpm.Diffusion(1000, "cosine")])
    assert ts == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999] and len(rows) == 4 and len(rows[0]) == 10
    betas = {"linear": torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)}
    for i, (x, eps) in enumerate(zip(x0, noise)):
        for k, schedule in enumerate(("linear", "cosine")):
            row = rows[2 * i + k]
            assert (row[0] - x).abs().mean() < 0.01
            assert torch.corrcoef(torch.stack([row[0].flatten(), x.flatten()]))[0, 1] > 0.999
            assert torch.corrcoef(torch.stack([row[-1].flatten(), x.flatten()]))[0, 1].abs() < 0.1   # noise at T − 1
            if schedule in betas:  # Eq. 4 from an independent ᾱ: the same ε in every column of the row
                a = torch.cumprod(1 - betas[schedule], 0)[ts].float().view(-1, 1, 1, 1)
                assert torch.allclose(torch.stack(list(row)), a.sqrt() * x + (1 - a).sqrt() * eps, atol=1e-5)


def test_a_run_folder_that_vanishes_and_a_full_disk_while_sampling_are_one_line(ckpts, folder, tmp_path, monkeypatch,
                                                                               capsys):
    out, real = tmp_path / "run", runs.save_atomic

    def vanish(path, *a, **k):
        shutil.rmtree(out, ignore_errors=True)
        return real(path, *a, **k)
    monkeypatch.setattr(trainer, "save_atomic", vanish)
    code, err = run_main(["train", "--data", folder, "--out", str(out), "--steps", "3", *TINY], capsys)
    assert code == 1 and "No such file or directory" in err and "no checkpoint is left" in err
    assert "Traceback" not in err
    monkeypatch.setattr(trainer, "save_atomic", real)

    saves, real_save = [], Image.Image.save

    def full_after_two(self, f, *a, **k):  # the disk fills up at the third picture, halfway into it
        saves.append(1)
        if len(saves) <= 2:
            return real_save(self, f, *a, **k)
        f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Image.Image, "save", full_after_two)
    code, err = run_main(["sample", "--ckpt", ckpts["cond"], "--n", "5", "--steps", "1", "--batch-size", "8", "--out",
                          str(tmp_path / "each") + "/"], capsys)
    assert code == 1 and err.count("\n") == 1 and "No space left on device" in err
    written = sorted(os.listdir(tmp_path / "each"))  # two whole pictures, nothing half-written, no temporary file
    assert len(written) == 2 and all(f.endswith(".png") and ".tmp" not in f for f in written)
    assert all(Image.open(tmp_path / "each" / f).size == (16, 16) for f in written)


def test_samples_that_are_not_finite_are_written_black_and_said(ckpts, tmp_path, capsys):
    """A model whose weights hold a NaN samples NaN, which a PNG stores as 0: a note says why the images are black."""
    ckpt = torch.load(ckpts["cond"], weights_only=True)
    ckpt["ema"]["model"]["conv_in.weight"][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    out = tmp_path / "black.png"
    code, err = run_main(["sample", "--ckpt", str(tmp_path / "nan.pt"), "--n", "2", "--steps", "3", "--out", str(out)],
                         capsys)
    assert code == 0 and "note: 2 of 2 samples hold NaN or inf" in err
    assert np.asarray(Image.open(out)).max() == 0  # the samples and make_grid's padding: all black


def test_inpaint_writes_the_known_pixels_exactly_in_the_png(ckpts, folder, tmp_path, capsys):
    out = tmp_path / "inpainted"
    argv = ["inpaint", folder, "--ckpt", ckpts["cond"], "--n", "3", "--out", f"{out}/", "--steps", "4"]
    code, err = run_main(argv, capsys)
    assert code == 0 and "wrote 3 results of inpaint" in err
    run = sampling.load_run(ckpts["cond"], "cpu", "fp32")  # below the command line: values, not flags
    inputs, labels, index = sampling.edit_inputs(folder, run, n=3, seed=0)
    assert torch.equal(index, torch.arange(3)) and labels is not None  # the folder's classes are the model's
    known = sampling.load_mask(None, 16)[0, 0] > 0
    for i in range(3):
        written = torch.from_numpy(np.array(Image.open(out / f"{i:06d}.png"))).permute(2, 0, 1)
        expected = data.to_uint8(inputs[i])
        assert torch.equal(written[:, known], expected[:, known])
    code, err = run_main(["inpaint", folder, "--ckpt", ckpts["cond"], "--n", "2", "--steps", "3",
                          "--out", str(tmp_path / "strip.png"), "--class", "ship"], capsys)
    assert code == 0 and Image.open(tmp_path / "strip.png").size[0] > 3 * 16


def test_interpolate_and_img2img_write_strips(ckpts, folder, tmp_path, capsys):
    code, err = run_main(["interpolate", "--ckpt", ckpts["cond"], "--frames", "5", "--steps", "3",
                          "--out", str(tmp_path / "i.png")], capsys)
    assert code == 0 and "wrote 10 results of interpolate" in err and "eta 0.0" in err  # 2 classes × 5
    image = os.path.join(folder, "cat", "1.png")
    code, err = run_main(["img2img", image, "--ckpt", ckpts["uncond"], "--strength", "0.25,0.5,0.75", "--n", "2",
                          "--steps", "3", "--out", str(tmp_path / "f.png")], capsys)
    assert code == 0 and "wrote 6 results of img2img" in err and os.path.isfile(tmp_path / "f.png")
    code, err = run_main(["img2img", folder, "--ckpt", ckpts["cond"], "--n", "3", "--steps", "2", "--out",
                          str(tmp_path / "each") + "/"], capsys)  # three of the folder's images, a PNG each
    assert code == 0 and sorted(os.listdir(tmp_path / "each")) == ["000000.png", "000001.png", "000002.png"]


def test_editing_refusals_are_one_line(ckpts, folder, tmp_path, capsys):
    grey = grey_run(tmp_path)
    capsys.readouterr()
    image = os.path.join(folder, "cat", "1.png")
    Image.new("L", (9, 9), 255).save(tmp_path / "small_mask.png")
    (tmp_path / "not_an_image.png").write_text("hello")
    Image.new("F", (16, 16), 0.5).save(tmp_path / "float_mask.tif")
    grey_image = os.path.join(tmp_path, "grey", "c", "0.png")
    cases = [
        (["inpaint", image, "--mask", str(tmp_path / "small_mask.png")], "9×9 pixels; it must be 16×16"),
        (["inpaint", image, "--mask", str(tmp_path / "not_an_image.png")], "cannot read it as an image"),
        (["inpaint", image, "--mask", str(tmp_path / "float_mask.tif")], "float_mask.tif: mode F: no range to show"),
        (["inpaint", str(tmp_path / "not_an_image.png")], "cannot read image"),
        (["img2img", str(tmp_path / "not_an_image.png")], "cannot read image"),
        (["img2img", str(tmp_path / "nowhere.png")], "no such file or folder"),
        (["img2img", image, "--strength", "1.5"], "outside [0, 1]"),
        (["img2img", image, "--strength", "-0.1"], "outside [0, 1]"),
        (["inpaint", grey_image], "grey images; the model makes colour ones"),
        (["img2img", image, "--ckpt", grey], "colour images; the model makes grey ones"),
        (["inpaint", folder, "--n", "7"], "--n 7: the data has only 6 images"),
        (["inpaint", image, "--resample", "2", "--sampler", "dpm++"], "resampling needs ancestral or ddim"),
        (["interpolate", "--frames", "1"], "outside [2, 1000]"),
        (["interpolate", "--frames", "3", "--sampler", "ancestral"], "needs a deterministic sampler"),
        (["interpolate", "--frames", "3", "--eta", "1"], "needs a deterministic sampler"),
        (["interpolate", "--n", "4"], "unrecognized arguments: --n 4"),  # each command takes only its own flags
        (["sample", "--inpaint", image], "unrecognized arguments: --inpaint"),  # the flags before the commands: gone
        (["sample", "--from", image], "unrecognized arguments: --from"),
        (["sample", "--interpolate", "3"], "unrecognized arguments: --interpolate"),
        (["sample", "--mask", image], "unrecognized arguments: --mask"),
        (["img2img", image, "--resample", "2"], "unrecognized arguments: --resample"),
        (["inpaint", image, "--process"], "unrecognized arguments: --process"),
    ]
    for extra, message in cases:
        argv = [*extra, "--ckpt", ckpts["cond"], "--steps", "2", "--out", str(tmp_path / "o.png")]
        if "--ckpt" in extra:
            argv = [*extra, "--steps", "2", "--out", str(tmp_path / "o.png")]
        code, err = run_main(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, (extra, err)
    assert not os.path.exists(tmp_path / "o.png")
