"""Tests for non-square images (train --image-size H,W, and every command that follows the model's H×W) and for
activation checkpointing (train --grad-checkpoint: the same loss and gradients, bit for bit). CPU only."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from conftest import TINY, fake_inception, randomize, run_main  # noqa: F401 (a fixture)

WIDE = [*TINY, "--image-size", "16,32"]  # TINY's network on 16 × 32 images


@pytest.fixture(scope="module")
def banners(tmp_path_factory):
    """Two classes of three images each, 40 high and 80 wide: the aspect ratio of 16×32."""
    root = tmp_path_factory.mktemp("banners")
    g = torch.Generator().manual_seed(0)
    for name in ("sky", "sea"):
        os.makedirs(root / name)
        for i in range(3):
            Image.fromarray((torch.rand(40, 80, 3, generator=g) * 255).to(torch.uint8).numpy()).save(
                root / name / f"{i}.png")
    return str(root)


def test_images_are_resized_to_cover_the_size_and_centre_cropped_never_stretched():
    image = Image.fromarray(np.arange(40 * 80 * 3, dtype=np.uint8).reshape(40, 80, 3))
    assert ddpm.resize_crop(image, (16, 32)).size == (32, 16)                   # the same aspect: resized only
    square = ddpm.resize_crop(image, 16)                                         # the short side to 16, then cropped
    assert square.size == (16, 16)
    reference = ddpm.resize_crop(image, (16, 32)).crop((8, 0, 24, 16))         # the centre of the 16×32 one
    assert np.array_equal(np.asarray(square), np.asarray(reference))
    tall = ddpm.resize_crop(image, (32, 16))                                    # another aspect: covered, cropped
    assert tall.size == (16, 32)
    batch = torch.zeros(2, 3, 28, 28)
    assert ddpm.resize_crop(batch, (16, 32)).shape == (2, 3, 16, 32)


def test_a_16_by_32_run_trains_resumes_bitwise_and_every_command_follows_its_size(banners, tmp_path, capsys,
                                                                                fake_inception):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert ddpm.main(["train", "--data", banners, "--out", straight, "--steps", "4", *WIDE]) == 0
    assert ddpm.main(["train", "--data", banners, "--out", resumed, "--steps", "2", *WIDE]) == 0
    assert ddpm.main(["train", "--resume", "--out", resumed, "--steps", "4"]) == 0
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(resumed, "ckpt.pt"), weights_only=True)
    assert a["config"]["image_size"] == (16, 32) and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ckpt = os.path.join(straight, "ckpt.pt")
    capsys.readouterr()
    code, err = run_main(["sample", "--ckpt", ckpt, "--n", "2", "--steps", "2", "--out", f"{tmp_path}/s/"], capsys)
    assert code == 0 and [Image.open(tmp_path / "s" / f).size for f in sorted(os.listdir(tmp_path / "s"))] == \
        [(32, 16)] * 2, err                                                       # PIL: width × height
    mask = np.zeros((16, 32), np.uint8)
    mask[4:12, 8:24] = 255                                                      # white: painted
    Image.fromarray(mask).save(tmp_path / "mask.png")
    image = os.path.join(banners, "sky", "0.png")
    code, err = run_main(["inpaint", image, "--ckpt", ckpt, "--mask", str(tmp_path / "mask.png"), "--n", "1",
                          "--steps", "2", "--out", f"{tmp_path}/i/"], capsys)
    assert code == 0, err
    written = np.asarray(Image.open(tmp_path / "i" / "000000.png"))
    expected = np.asarray(ddpm.resize_crop(Image.open(image).convert("RGB"), (16, 32)))
    assert written.shape == (16, 32, 3) and np.array_equal(written[mask == 0], expected[mask == 0])
    for argv in (["img2img", image, "--strength", "0.5", "--n", "1"], ["interpolate", "--frames", "2"],
                 ["fid", "--n", "4"], ["nll", "--data", banners, "--n", "2", "--t-samples", "2"]):
        code, err = run_main([*argv, "--ckpt", ckpt, *([] if argv[0] == "nll" else ["--steps", "2"])], capsys)
        assert code == 0, (argv, err)


def test_activation_checkpointing_gives_the_same_loss_and_gradients_bit_for_bit():
    torch.manual_seed(0)
    model = ddpm.UNet(3, 32, (1, 2), 1, (8,), 0.3, (8, 16), num_classes=2)     # dropout: its masks must repeat
    d = ddpm.Diffusion(50)
    x0 = torch.rand(4, 3, 8, 16) * 2 - 1
    y = torch.tensor([0, 1, 1, 0])
    results = []
    for on in (False, True):
        for block in model.modules():
            if isinstance(block, ddpm.ResBlock):
                block.checkpoint = on
        model.zero_grad()
        torch.manual_seed(1)
        loss = d.training_loss(model, x0, y, 0.2, torch.Generator().manual_seed(2))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    assert sum(g.abs().sum() for g in grads_a) > 0


def test_grad_checkpoint_trains_the_same_bits_also_with_micro_batches_and_a_resume_may_turn_it_on(banners,
                                                                                                   tmp_path):
    runs = {}
    for name, extra in [("plain", []), ("checkpointed", ["--grad-checkpoint"]),
                        ("both", ["--grad-checkpoint", "--micro-batch", "2"])]:
        out = str(tmp_path / name)
        assert ddpm.main(["train", "--data", banners, "--out", out, "--steps", "2", "--dropout", "0.2", *WIDE,
                          *extra]) == 0
        runs[name] = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    plain = runs["plain"]["model"]
    assert all(torch.equal(plain[k], runs["checkpointed"]["model"][k]) for k in plain)
    both = runs["both"]["model"]  # micro-batches sum the gradient in another order: equal to rounding
    assert all(torch.allclose(plain[k], both[k], atol=1e-6) for k in plain)
    assert runs["checkpointed"]["config"]["grad_checkpoint"] is True
    assert ddpm.main(["train", "--resume", "--out", str(tmp_path / "plain"), "--steps", "3",
                      "--grad-checkpoint"]) == 0  # memory, not results: a resume may change it
