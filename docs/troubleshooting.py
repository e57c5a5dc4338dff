"""Reproduces the symptoms of docs/troubleshooting.md on a CPU, each with the number that shows it and the fix that
removes it. Needs the MNIST folder torchvision reads (shared/data) and the bundled model; ~15 minutes on 2 cores.

    python docs/troubleshooting.py --mnist /tmp/mnist
"""
import argparse, os, subprocess, sys, tempfile

import numpy as np
import torch
from PIL import Image

here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, here)
from ddpm_tool import data  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--mnist", required=True, help="the folder torchvision's MNIST reads (MNIST/raw/...)")
args = p.parse_args()
work = tempfile.mkdtemp()
bundled = os.path.join(here, "samples", "cifar10_small.pt")


def run(*argv):
    done = subprocess.run([sys.executable, os.path.join(here, "ddpm.py"), *argv], capture_output=True, text=True)
    return done.returncode, done.stderr.strip().split("\n")[-1]


def tiles(path, size):  # a sample grid (1-px padding) → its images (N, size, size, 3) in [0, 1]
    grid = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255
    rows, cols = (grid.shape[0] - 1) // (size + 1), (grid.shape[1] - 1) // (size + 1)
    return np.stack([grid[1 + r * (size + 1):1 + r * (size + 1) + size, 1 + c * (size + 1):1 + c * (size + 1) + size]
                     for r in range(rows) for c in range(cols)])


def digits(ckpt, name, *flags):
    """100 samples of an MNIST model → (N, 28, 28) in [0, 1], and what shows each symptom: the mean border (MNIST's
    own: black), the share of images whose border is grey, and speckle (neighbouring background pixels' difference)."""
    out = os.path.join(work, f"{name}.png")
    run("sample", "--ckpt", ckpt, "--n", "100", "--out", out, "--precision", "fp32", *flags)
    x = tiles(out, 28)[..., 0]
    border = np.concatenate([x[:, :3], x[:, -3:], x[:, :, :3].transpose(0, 2, 1), x[:, :, -3:].transpose(0, 2, 1)], 1)
    speckle = np.abs(np.diff(x, axis=2))[x[:, :, :-1] < 0.2].mean()
    grey = np.mean(border.mean((1, 2)) > 0.1)
    print(f"  {name}: border {border.mean():.3f}, grey backgrounds (border > 0.1) {grey:.0%}, background speckle "
          f"{speckle:.4f}")
    return x


def train(name, *flags):
    out = os.path.join(work, name)
    code, line = run("train", "--data", "mnist", "--preset", "small", "--data-root", args.mnist, "--out", out,
                     "--sample-every", "0", *flags)
    print(f"  train {name}: {line}")
    return os.path.join(out, "ckpt.pt")


images, labels, _ = data.load_images("mnist", args.mnist, 28)
print("Noisy, grey: the MNIST preset (the quick start) after 40, 300 and its 1,150 steps; then η = 0 on the last")
steps = {n: train(f"steps{n}", "--steps", str(n)) for n in (40, 300, 1150)}
for n, ckpt in steps.items():
    digits(ckpt, f"{n} steps")
digits(steps[1150], "1150 steps, --eta 0", "--eta", "0")

print("Over-saturated colours: strong guidance (the bundled model, 16 horses, the CPU default sampler)")
for g in ("1", "2", "4", "8"):
    out = os.path.join(work, f"guidance{g}.png")
    run("sample", "--ckpt", bundled, "--class", "horse", "--n", "16", "--guidance", g, "--out", out)
    x = tiles(out, 32)
    saturation = (x.max(-1) - x.min(-1)) / np.maximum(x.max(-1), 1e-6)
    at_ends = np.mean((x <= 1 / 255) | (x >= 254 / 255))
    print(f"  --guidance {g}: mean saturation {saturation.mean():.3f}, pixels at 0 or 255 {at_ends:.1%}")

print("A NaN loss: a learning rate far too high")
train("nan", "--lr", "1", "--warmup", "0", "--steps", "300", "--log-every", "10")

print("Black samples: one NaN among the MNIST model's weights")
ckpt = torch.load(steps[1150], weights_only=True)
ckpt["ema"]["model"]["conv_in.weight"][0] = float("nan")
torch.save(ckpt, os.path.join(work, "nan.pt"))
black = os.path.join(work, "black.png")
said = subprocess.run([sys.executable, os.path.join(here, "ddpm.py"), "sample", "--ckpt", os.path.join(work, "nan.pt"),
                       "--n", "2", "--out", black], capture_output=True, text=True).stderr
print("  sample:", *[line for line in said.split("\n") if line.startswith("note")])
print("  the PNG's largest pixel value:", np.asarray(Image.open(black)).max())

print("A small data set: memorised images: 32 MNIST digits (the preset, at their 28 px) against the whole training set")
few = os.path.join(work, "few")
for i in range(32):
    os.makedirs(os.path.join(few, str(int(labels[i]))), exist_ok=True)
    Image.fromarray(images[i, 0].numpy()).save(os.path.join(few, str(int(labels[i])), f"{i}.png"))
small = os.path.join(work, "small")
print("  train:", run("train", "--data", few, "--preset", "small", "--image-size", "28", "--out", small, "--no-flip",
                      "--sample-every", "0"))
seen = images[:32, 0].double().numpy() / 255
for ckpt, name in ((f"{small}/ckpt.pt", "32 images"), (steps[1150], "60,000 images")):
    x = digits(ckpt, f"model of {name}")
    nearest = ((x[:, None] - seen[None]) ** 2).mean(axis=(2, 3)).min(axis=1)
    print(f"    within MSE 0.01 of one of the 32 digits: {np.mean(nearest < 0.01):.0%} of the samples, median MSE to "
          f"the nearest {np.median(nearest):.3f}")
print(f"(working folder {work})")
