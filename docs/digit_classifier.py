"""A digit classifier of our own, to score class-conditional MNIST samples (docs/learning_faster.sh).

    python docs/digit_classifier.py train CLASSIFIER.pt DATA_ROOT     # MNIST as torchvision lays it out
    python docs/digit_classifier.py score CLASSIFIER.pt SAMPLES_DIR   # the PNGs of `sample --n N --out DIR/`

`score` reads the files in name order: `sample --out DIR/` writes the classes in turn, N / 10 of each (class
i // (N / 10) for file i). It prints the accuracy, its standard error, and the test split's accuracy for scale.
"""
import glob
import math
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


def network():
    """Two convolutions and two linear layers: about 99% on MNIST's test split after two epochs."""
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))


def mnist(root, train):
    from torchvision.datasets import MNIST
    data = MNIST(root, train=train, download=False)
    return data.data[:, None].float() / 255, data.targets


def accuracy(model, images, labels):
    with torch.no_grad():
        predicted = torch.cat([model(x).argmax(1) for x in images.split(500)])
    return (predicted == labels).float().mean().item()


def train(path, root, epochs=2, seed=0):
    torch.manual_seed(seed)
    images, labels = mnist(root, True)
    model = network()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(epochs):
        for batch in torch.randperm(len(images)).split(128):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
    test_images, test_labels = mnist(root, False)
    print(f"test accuracy {accuracy(model.eval(), test_images, test_labels):.4f} ({len(test_labels)} digits)")
    torch.save(model.state_dict(), path)


def score(path, folder):
    model = network()
    model.load_state_dict(torch.load(path, weights_only=True))
    files = sorted(glob.glob(f"{folder}/*.png"))
    per = len(files) // 10
    grey = [np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255 for f in files]
    images = torch.from_numpy(np.stack(grey))[:, None]
    labels = torch.arange(len(files)) // per
    acc = accuracy(model.eval(), images, labels)
    print(f"accuracy {acc:.4f} ± {math.sqrt(acc * (1 - acc) / len(files)):.4f} ({len(files)} samples)")


if __name__ == "__main__":
    {"train": train, "score": score}[sys.argv[1]](*sys.argv[2:])
