"""Reproduces the symptoms of docs/troubleshooting.md on a CPU, each with the number that shows it and the fix that
removes it. Needs the MNIST folder torchvision reads (shared/data) and the bundled model; ~10 minutes on 2 cores.

    python docs/troubleshooting.py --mnist /tmp/mnist
"""
import argparse, os, subprocess, sys, tempfile

import numpy as np
from PIL import Image

here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, here)
import ddpm  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--mnist", required=True, help="the folder torchvision's MNIST reads (MNIST/raw/...)")
args = p.parse_args()
work = tempfile.mkdtemp()
bundled = os.path.join(here, "samples", "cifar10_small.pt")


def run(*argv):
    done = subprocess.run([sys.executable, os.path.join(here, "ddpm.py"), *argv], capture_output=True, text=True)
    return done.returncode, done.stderr.strip().split("\n")[-1]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


def tiles(path, size):  # a sample grid (1-px padding) → its images (N, size, size, 3)
    grid = pixels(path)
    rows, cols = (grid.shape[0] - 1) // (size + 1), (grid.shape[1] - 1) // (size + 1)
    return np.stack([grid[1 + r * (size + 1):1 + r * (size + 1) + size, 1 + c * (size + 1):1 + c * (size + 1) + size]
                     for r in range(rows) for c in range(cols)])


def speckle(x):  # the mean absolute difference between neighbouring pixels of the background (ink < 0.2)
    diff = np.abs(np.diff(x[..., 0], axis=2))
    return diff[x[..., :-1, 0] < 0.2].mean()


images, labels, classes = ddpm.load_images("mnist", args.mnist, 28)
real = images.double().numpy()[:, 0] / 255
print(f"MNIST's own digits: the pixels' spread within an image {real.std(axis=(1, 2)).mean():.3f}, ink (> 0.5) "
      f"{np.mean(real > 0.5):.1%} of the pixels, background speckle {speckle(real[:1000, ..., None]):.4f}")
print("1. Speckled digits: a briefly trained MNIST model (the quick start) sampled deterministically")
mnist = os.path.join(work, "mnist")
print("  train:", run("train", "--data", "mnist", "--preset", "small", "--data-root", args.mnist, "--out", mnist))
for eta in ("1", "0"):
    out = os.path.join(work, f"eta{eta}.png")
    run("sample", "--ckpt", f"{mnist}/ckpt.pt", "--n", "100", "--eta", eta, "--out", out, "--precision", "fp32")
    print(f"  --eta {eta}: background speckle {speckle(tiles(out, 28)):.4f} (mean |neighbour difference|)")

print("2. Over-saturated colours: strong guidance (the bundled model, 16 horses)")
for g in ("1", "2", "4", "8"):
    out = os.path.join(work, f"g{g}.png")
    run("sample", "--ckpt", bundled, "--class", "horse", "--n", "16", "--guidance", g, "--out", out)
    x = tiles(out, 32)
    saturation = (x.max(-1) - x.min(-1)) / np.maximum(x.max(-1), 1e-6)
    clipped = np.mean((x <= 1 / 255) | (x >= 254 / 255))
    print(f"  --guidance {g}: mean saturation {saturation.mean():.3f}, pixels at 0 or 255 {clipped:.1%}")

print("3. Grey blobs: a model sampled long before it has learnt (MNIST preset small, 40 steps)")
early = os.path.join(work, "early")
print("  train:", run("train", "--data", "mnist", "--preset", "small", "--data-root", args.mnist, "--out", early,
                      "--steps", "40", "--sample-every", "0"))
for ckpt, name in ((f"{early}/ckpt.pt", "40 steps"), (f"{mnist}/ckpt.pt", "1,150 steps")):
    out = os.path.join(work, f"{name[:2]}.png")
    run("sample", "--ckpt", ckpt, "--n", "100", "--out", out, "--precision", "fp32")
    x = tiles(out, 28)[..., 0]
    print(f"  {name}: the pixels' spread within an image {x.std(axis=(1, 2)).mean():.3f}, ink (> 0.5) "
          f"{np.mean(x > 0.5):.1%} of the pixels")

print("4. A non-finite loss: a learning rate far too high")
print("  --lr 1:", run("train", "--data", "mnist", "--preset", "small", "--data-root", args.mnist, "--out",
                       os.path.join(work, "nan"), "--lr", "1", "--warmup", "0", "--steps", "300", "--log-every", "10",
                       "--sample-every", "0"))

print("5. Memorised images: a small data set (32 MNIST digits) against the whole one, preset small")
few = os.path.join(work, "few")
for c in range(10):
    os.makedirs(os.path.join(few, str(c)))
for i in range(32):
    Image.fromarray(images[i, 0].numpy()).save(os.path.join(few, str(int(labels[i])), f"{i}.png"))
small = os.path.join(work, "small")
print("  train:", run("train", "--data", few, "--preset", "small", "--out", small, "--no-flip"))
train_set = real[:32]
for ckpt, name in ((f"{small}/ckpt.pt", "32 images"), (f"{mnist}/ckpt.pt", "60,000 images")):
    out = os.path.join(work, f"nn{name[:2]}.png")
    run("sample", "--ckpt", ckpt, "--n", "100", "--out", out, "--precision", "fp32")
    x = tiles(out, 28)[..., 0]
    nearest = ((x[:, None] - train_set[None]) ** 2).mean(axis=(2, 3)).min(axis=1)
    print(f"  model of {name}: samples within MSE 0.01 of one of the 32 digits {np.mean(nearest < 0.01):.0%}, "
          f"median MSE to the nearest {np.median(nearest):.3f}")
print(f"(working folder {work})")
