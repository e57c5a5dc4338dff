"""CIFAR-10 as the image folders the README's examples use: <out>/train/<class>/NNNN.png (5,000 a class) and
<out>/test/<class>/NNNN.png (1,000 a class), in the data set's order, from torchvision's copy (downloaded into
--data-root, or read from there offline: cifar-10-batches-py/).

    python docs/cifar10_folders.py /tmp/cifar10 --data-root ./data
"""
import argparse, os

import torchvision
from PIL import Image

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--data-root", default="./data")
args = p.parse_args()
for split in ("train", "test"):
    ds = torchvision.datasets.CIFAR10(args.data_root, train=split == "train", download=True)
    counts = {}
    for pixels, label in zip(ds.data, ds.targets):
        folder = os.path.join(args.out, split, ds.classes[label])
        os.makedirs(folder, exist_ok=True)
        counts[label] = counts.get(label, 0) + 1
        Image.fromarray(pixels).save(os.path.join(folder, f"{counts[label]:04d}.png"))
    print(f"{split}: {len(ds.data)} images in {os.path.join(args.out, split)}")
