"""Tests for editing with a trained model (Diffusion.sample's known, image and strength; slerp) and the commands
`inpaint`, `interpolate` and `img2img`: exact properties on the CPU, and each refusal in one line."""
import argparse, math, os

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from conftest import Oracle, grey_run, randomize, run_main

SAMPLERS = [dict(), dict(steps=6), dict(steps=6, eta=1.0), dict(steps=6, sampler="dpm++")]


def tiny(seed=0):
    model = ddpm.UNet(3, 16, (1, 2), 1, (8,), 0.0, 16, num_classes=2)
    return randomize(model, seed)


def centre_known(n, size=16):
    known = torch.ones(n, 3, size, size)
    known[..., 4:12, 4:12] = 0
    return known


@pytest.mark.parametrize("options", SAMPLERS)
def test_inpainting_keeps_every_known_pixel_exactly(options):
    d = ddpm.Diffusion(20)
    g = torch.Generator().manual_seed(0)
    x_known = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    mask = centre_known(3)
    x = d.sample(tiny(), 3, torch.tensor([0, 1, 0]), 2.0, generator=g, known=(x_known, mask), **options)
    assert torch.equal(x[mask > 0], x_known[mask > 0])
    assert not torch.allclose(x[mask == 0], x_known[mask == 0])             # the hole is the model's


@pytest.mark.parametrize("options", SAMPLERS)
def test_inpainting_with_the_oracle_of_single_point_data_returns_that_point(options):
    d = ddpm.Diffusion(50)
    g = torch.Generator().manual_seed(1)
    x_star = torch.rand(1, 3, 16, 16, generator=g) * 1.6 - 0.8
    mask = centre_known(2)
    x_known = torch.where(mask > 0, x_star, torch.zeros(1))                  # the hole's pixels are not given
    x = d.sample(Oracle(d, x_star), 2, generator=g, known=(x_known, mask), **options)
    assert (x - x_star).abs().max().item() < 1e-3


@pytest.mark.parametrize("options", SAMPLERS)
def test_strength_0_returns_the_input_and_strength_1_is_plain_sampling(options):
    d = ddpm.Diffusion(20)
    model = tiny(2)
    y = torch.tensor([1, 0])
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn(2, 3, 16, 16)
    assert torch.equal(d.sample(model, 2, y, 2.0, noise=noise, image=image, strength=0.0, **options), image)
    plain = d.sample(model, 2, y, 2.0, noise=noise, generator=torch.Generator().manual_seed(3), **options)
    edited = d.sample(model, 2, y, 2.0, noise=noise, generator=torch.Generator().manual_seed(3), image=image,
                      strength=1.0, **options)
    assert torch.equal(plain, edited)


@pytest.mark.parametrize("options", SAMPLERS[1:])
def test_strength_starts_the_sampler_at_its_step_from_the_noised_image(options):
    """SDEdit: the first x_t the network sees is q(x_t | image) with the start noise, at t = round(s · (T − 1));
    then the sampler's own steps below it, down to 0."""
    d = ddpm.Diffusion(100)
    seen = []
    model = tiny(7)
    real = model.forward
    model.forward = lambda x, t, y=None: seen.append((x.clone(), t.clone())) or real(x, t, y)
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    noise = torch.randn(2, 3, 16, 16)
    d.sample(model, 2, noise=noise, image=image, strength=0.4, **options)
    visited = [int(t[0]) for _, t in seen]
    assert visited[0] == round(0.4 * 99) and visited == sorted(visited, reverse=True) and visited[-1] == 0
    assert set(visited[1:]) <= set(d.sampling_steps(options["steps"], options.get("spacing", "uniform")))
    start = d.q_sample(image, torch.full((2,), visited[0]), noise)
    assert torch.equal(seen[0][0], start)


def test_slerp_ends_are_the_noises_and_keeps_the_norm():
    g = torch.Generator().manual_seed(4)
    z1 = torch.randn(3, 16, 16, generator=g)
    z2 = torch.randn(3, 16, 16, generator=g)
    z2 = z2 * (z1.norm() / z2.norm())                                          # equal norms r
    assert torch.equal(ddpm.slerp(z1, z2, 0.0), z1) and torch.equal(ddpm.slerp(z1, z2, 1.0), z2)
    for lam in [0.1, 0.25, 0.5, 0.9]:
        assert ddpm.slerp(z1, z2, lam).norm().item() == pytest.approx(z1.norm().item(), rel=1e-5)
    linear = 0.5 * z1 + 0.5 * z2
    assert linear.norm() < 0.8 * z1.norm()                                    # what a linear mix would do
    # unequal norms: the norm slerp gives, ‖a z1 + b z2‖ with a, b its weights, computed in float64
    z3 = 2 * torch.randn(3, 16, 16, generator=g)
    theta = math.acos((z1.double().flatten() @ z3.double().flatten() / (z1.double().norm() * z3.double().norm())))
    for lam in [0.3, 0.7]:
        a, b = math.sin((1 - lam) * theta) / math.sin(theta), math.sin(lam * theta) / math.sin(theta)
        expected = (a * z1.double() + b * z3.double()).norm().item()
        assert ddpm.slerp(z1, z3, lam).norm().item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("options", [dict(steps=6), dict(steps=6, sampler="dpm++")])
def test_interpolation_ends_equal_the_samples_of_the_two_noises(options):
    d = ddpm.Diffusion(20)
    model = tiny(5)
    g = torch.Generator().manual_seed(6)
    z1, z2 = torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 16, generator=g)
    frames = torch.stack([ddpm.slerp(z1, z2, lam) for lam in (0.0, 1 / 3, 2 / 3, 1.0)])
    y = torch.tensor([1, 1, 1, 1])
    x = d.sample(model, 4, y, 2.0, noise=frames, **options)
    ends = d.sample(model, 4, y, 2.0, noise=torch.stack([z1, z1, z2, z2]), **options)
    assert torch.equal(x[0], ends[0]) and torch.equal(x[3], ends[3])


def test_inpaint_writes_the_known_pixels_exactly_in_the_png(ckpts, folder, tmp_path, capsys):
    out = tmp_path / "inpainted"
    argv = ["inpaint", folder, "--ckpt", ckpts["cond"], "--n", "3", "--out", f"{out}/", "--steps", "4"]
    code, err = run_main(argv, capsys)
    assert code == 0 and "wrote 3 results of inpaint" in err
    args = argparse.Namespace(input=folder, n=3, seed=0, command="inpaint", ckpt=ckpts["cond"], device="cpu",
                              precision="fp32", batch_size=None, compile=None, sampler=None, steps=4, eta=None,
                              spacing=None, guidance=2.0, **{"class": None})
    inputs, labels, index = ddpm.edit_inputs(args, ddpm.load_run(args))
    assert torch.equal(index, torch.arange(3)) and labels is not None  # the folder's classes are the model's
    known = ddpm.load_mask(None, 16)[0, 0] > 0
    for i in range(3):
        written = torch.from_numpy(np.array(Image.open(out / f"{i:06d}.png"))).permute(2, 0, 1)
        expected = ddpm.to_uint8(inputs[i])
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
    grey_image = os.path.join(tmp_path, "grey", "c", "0.png")
    cases = [
        (["inpaint", image, "--mask", str(tmp_path / "small_mask.png")], "9×9 pixels; it must be 16×16"),
        (["inpaint", image, "--mask", str(tmp_path / "not_an_image.png")], "cannot read it as an image"),
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


def test_resampling_redoes_each_step_as_repaint_does_and_keeps_the_known_pixels():
    """known = (x_known, mask, r): each step but the last is redone r times, going back by q(x_t | x_{t'}) in
    between; written out here step by step with DDIM's update, it gives the same bits."""
    d = ddpm.Diffusion(20)
    model = tiny(8)
    y = torch.tensor([0, 1])
    g = torch.Generator().manual_seed(9)
    x_known = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    mask = centre_known(2)
    calls = []
    real = model.forward
    model.forward = lambda x, t, y=None: calls.append(int(t[0])) or real(x, t, y)
    x = d.sample(model, 2, y, 2.0, 4, 1.0, torch.Generator().manual_seed(1), known=(x_known, mask, 3))
    ts = d.sampling_steps(4)
    assert calls == [ts[3]] * 3 + [ts[2]] * 3 + [ts[1]] * 3 + [ts[0]]              # guided: one batched call a step
    assert torch.equal(x[mask > 0], x_known[mask > 0])
    g = torch.Generator().manual_seed(1)
    a = d.alphas_cumprod.tolist()
    expected = torch.randn(2, 3, 16, 16, generator=g)
    for i in reversed(range(4)):
        for k in range(3 if i > 0 else 1):
            z = torch.randn(expected.shape, generator=g) if i > 0 else 0
            x0 = d.predict_x0(model, expected, torch.full((2,), ts[i]), y, 2.0)
            at, ap = a[ts[i]], (a[ts[i - 1]] if i > 0 else 1.0)
            eps = (expected - at ** 0.5 * x0) / (1 - at) ** 0.5
            sigma = ((1 - ap) / (1 - at) * (1 - at / ap)) ** 0.5
            prev = ap ** 0.5 * x0 + max(1 - ap - sigma ** 2, 0.0) ** 0.5 * eps + sigma * z
            prev = d.paste_known(prev, ts, i, (x_known, mask), g)
            if k < 2 and i > 0:  # back to ts[i] by q(x_t | x_{t'}), to redo the step
                ratio = a[ts[i]] / a[ts[i - 1]]
                prev = ratio ** 0.5 * prev + (1 - ratio) ** 0.5 * torch.randn(prev.shape, generator=g)
            expected = prev
    assert torch.allclose(x, expected, atol=1e-6)
    with pytest.raises(ValueError, match="resampling needs ancestral or ddim"):
        d.sample(model, 2, steps=4, sampler="dpm++", known=(x_known, mask, 2))
