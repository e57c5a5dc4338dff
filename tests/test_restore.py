"""Tests for models conditioned on an image (train --task upscale|colorize, ddpm_tool/restore.py and the upscale and
colorize commands): the training pairs against independent computations, the rows and the measures the commands print,
and every refusal in one line."""
import math, os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddpm_tool import cli, data
from conftest import TINY, grey_run, run_main


@pytest.fixture(scope="module")
def tasks(folder, tmp_path_factory):
    """An upscale (×2, UPSCALE: two steps in micro-batches) and a colorize (one step) checkpoint of TINY on folder →
    {task: its path}."""
    base = tmp_path_factory.mktemp("tasks")
    paths = {}
    for task, extra in [("upscale", [*UPSCALE, "--steps", "2"]), ("colorize", ["--steps", "1"])]:
        out = str(base / task)
        assert cli.main(["train", "--data", folder, "--out", out, "--task", task, *extra, *TINY]) == 0
        paths[task] = os.path.join(out, "ckpt.pt")
    return paths


UPSCALE = ["--task", "upscale", "--factor", "2", "--micro-batch", "2"]


def test_the_pairs_are_sr3s_area_downsample_brought_back_bicubically_and_palettes_grey():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    blocks = x.view(2, 3, 4, 4, 4, 4).mean((3, 5))  # the mean of each 4 × 4 block: an area downsample
    expected = F.interpolate(blocks, size=(16, 16), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert torch.allclose(data.degrade(x, "upscale", 4), expected, atol=1e-6)
    pixels = ((x[0] + 1) * 127.5).round().to(torch.uint8)
    grey = np.asarray(Image.fromarray(pixels.permute(1, 2, 0).numpy()).convert("L"), dtype=np.float64)  # PIL's grey
    ours = (data.degrade(pixels[None].double() / 127.5 - 1, "colorize", 4)[0, 0] + 1) * 127.5
    assert ours.shape == (16, 16) and np.abs(ours.numpy() - grey).max() <= 0.5 + 1e-6  # PIL rounds to whole levels


def psnr(x, truth):  # uint8 arrays → dB
    return 10 * math.log10(255 ** 2 / np.mean((x.astype(np.float64) - truth.astype(np.float64)) ** 2))


def test_upscale_writes_rows_and_the_measures_of_a_known_truth(tasks, folder, tmp_path, capsys):
    image = os.path.join(folder, "cat", "1.png")
    code, err = run_main(["upscale", image, "--ckpt", tasks["upscale"], "--n", "2", "--steps", "2", "--out",
                          str(tmp_path / "u.png")], capsys)
    assert code == 0 and "wrote 2 results of upscale" in err, err
    with Image.open(tmp_path / "u.png") as im:
        assert im.size[0] > 4 * 16 * 2  # four columns: input, bicubic, result, truth
    truth = torch.from_numpy(np.array(Image.open(image))).permute(2, 0, 1)[None].float() / 127.5 - 1
    bicubic = data.to_uint8(data.degrade(truth, "upscale", 2))[0].permute(1, 2, 0).numpy()
    printed = float(err.split("bicubic ")[1].split(" dB")[0])
    assert printed == pytest.approx(psnr(bicubic, np.asarray(Image.open(image))), abs=0.006)
    assert "consistency (the result area-downsampled ×2 against the input)" in err
    Image.open(image).resize((8, 8), Image.BOX).save(tmp_path / "low.png")  # the model's low resolution: no truth
    code, err = run_main(["upscale", str(tmp_path / "low.png"), "--ckpt", tasks["upscale"], "--n", "3", "--steps",
                          "2", "--out", str(tmp_path / "each") + "/"], capsys)
    assert code == 0 and "PSNR" not in err, err
    files = sorted(os.listdir(tmp_path / "each"))
    assert files == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(tmp_path / "each" / files[0]).size == (16, 16)


def test_colorize_colours_a_grey_image_and_measures_a_colour_one(tasks, folder, tmp_path, capsys):
    image = os.path.join(folder, "ship", "2.png")
    code, err = run_main(["colorize", image, "--ckpt", tasks["colorize"], "--n", "1", "--steps", "2", "--out",
                          str(tmp_path / "c.png")], capsys)
    assert code == 0 and "PSNR against the truth, mean of 1: the result" in err and "the grey input" in err, err
    Image.open(image).convert("L").save(tmp_path / "grey.png")
    code, err = run_main(["colorize", str(tmp_path / "grey.png"), "--ckpt", tasks["colorize"], "--n", "1", "--steps",
                          "2", "--out", str(tmp_path / "g") + "/"], capsys)
    assert code == 0 and "PSNR" not in err, err
    assert Image.open(tmp_path / "g" / "000000.png").mode == "RGB"


def test_a_conditioned_model_resumes_bitwise(tasks, folder, tmp_path, capsys):
    args = ["train", "--data", folder, *UPSCALE, *TINY]  # one step, then a resume: the fixture's two steps exactly
    assert run_main([*args, "--steps", "1", "--out", str(tmp_path / "resumed")], capsys)[0] == 0
    assert run_main(["train", "--resume", "--out", str(tmp_path / "resumed"), "--steps", "2"], capsys)[0] == 0
    a, b = (torch.load(path, weights_only=True) for path in (tasks["upscale"], tmp_path / "resumed" / "ckpt.pt"))
    assert a["config"]["task"] == b["config"]["task"] == "upscale" and a["config"]["factor"] == 2 and b["step"] == 2
    assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())
    assert all(torch.equal(a["ema"]["model"][k], v) for k, v in b["ema"]["model"].items())
    assert a["model"]["conv_in.weight"].shape[1] == 6  # x_t and c


def test_refusals_are_one_line(tasks, ckpts, folder, tmp_path, capsys):
    image = os.path.join(folder, "cat", "1.png")
    Image.open(image).resize((12, 12)).save(tmp_path / "twelve.png")
    grey_run(tmp_path)  # its images: tmp_path/grey
    capsys.readouterr()
    up = tasks["upscale"]
    cases = [
        (["sample", "--ckpt", up], "a model of --task upscale, p(x | c), takes an image: use `python ddpm.py upscale"),
        (["img2img", image, "--ckpt", up], "use `python ddpm.py upscale IMAGE|FOLDER"),
        (["nll", "--ckpt", up], "a model of --task upscale"),
        (["colorize", image, "--ckpt", up], "use `python ddpm.py upscale"),
        (["upscale", image, "--ckpt", ckpts["cond"]], "a model that generates (no --task); upscale needs one of --task"),
        (["upscale", str(tmp_path / "twelve.png"), "--ckpt", up], "12×12 images; the model takes 16×16 (its own size) "
         "or 8×8 (its low resolution (×2))"),
        (["export", "--ckpt", up, "--format", "diffusers", "--out", str(tmp_path / "d")], "DDPMPipeline cannot give"),
        (["train", "--data", folder, "--task", "upscale", "--factor", "8", *TINY, "--image-size", "12",
          "--out", str(tmp_path / "r")], "--factor 8: the image size 12 is no multiple of it"),
        (["train", "--data", str(tmp_path / "grey"), "--task", "colorize", *TINY, "--out", str(tmp_path / "r")],
         "--task colorize: the images of --data"),
        (["train", "--data", folder, "--task", "upscale", "--factor", "3", *TINY], "argument --factor: 3: 2, 4 or 8"),
    ]
    for argv, message in cases:
        code, err = run_main(argv, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)
    assert not os.path.exists(tmp_path / "d") and not os.path.exists(tmp_path / "r")
    code, err = run_main(["export", "--ckpt", up, "--out", str(tmp_path / "up.pt")], capsys)  # fp16 .pt: it exports
    assert code == 0, err
    code, err = run_main(["upscale", image, "--ckpt", str(tmp_path / "up.pt"), "--n", "1", "--steps", "1", "--out",
                          str(tmp_path / "x.png")], capsys)
    assert code == 0 and "wrote 1 result of upscale" in err, err
