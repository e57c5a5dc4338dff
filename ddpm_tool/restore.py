"""
restore.py: what `upscale` and `colorize` do with a model trained with --task upscale (SR3) or colorize (Palette):
their inputs (low-resolution or grey images, or images of the model's own size, degraded as in training so that the
truth is known), the rows they write, and the measures they print when the truth is known.
"""
import os
import sys

import torch
import torch.nn.functional as F
from PIL import Image

from . import pictures
from .data import bicubic, degrade, image_files, to_uint8
from .runs import UserError, hw
from .sampling import draw, edit_inputs, write_samples


def first_image(path):
    """IMAGE, or FOLDER's first image as load_images orders them; the sizes of a folder's images are its first one's."""
    if os.path.isfile(path) or not os.path.isdir(path):
        return path  # (a missing path: edit_inputs says so)
    found = [f for files in image_files(path).values() for f in files]
    return found[0] if found else path


def task_inputs(path, run, n, seed, name, command):
    """IMAGE|FOLDER of `command` (the model's task) → (c (n, C', H, W), the truth (n, C, H, W) or None, the inputs as
    shown (n, C, H, W), the labels of the n results or None). An input of the model's own size is degraded as in
    training, and is the truth; a low-resolution one (upscale) or a grey one (colorize) is taken as c itself."""
    cfg = run.cfg
    H, W = hw(cfg["image_size"])
    factor = cfg["factor"]
    sizes = {(H, W): "its own size"}
    if command == "upscale":
        sizes[(H // factor, W // factor)] = f"its low resolution (×{factor})"
    size = (H, W)
    first = first_image(path)
    if os.path.isfile(first):
        with Image.open(first) as im:
            size = im.size[::-1]
    if size not in sizes:
        takes = " or ".join(f"{w}×{h} ({what})" for (h, w), what in sizes.items())
        raise UserError(f"{command} {path}: {size[1]}×{size[0]} images; the model takes {takes}, width × height")
    colours = (1, 3) if command == "colorize" else None
    images, labels, index = edit_inputs(path, run, n, seed, name, command, size, colours)
    images = images[index]
    if size == (H, W) and images.shape[1] == cfg["channels"]:  # the truth: degraded as the training pairs are
        cond = degrade(images, command, factor)
        low = F.avg_pool2d(images, factor)
        shown = cond if command == "colorize" else F.interpolate(low, scale_factor=factor)  # nearest: its pixels
        return cond, images, shown, labels
    if command == "colorize":  # a grey image
        return images, None, images, labels
    return bicubic(images, factor), None, F.interpolate(images, scale_factor=factor), labels


def psnr(x, truth):
    """PSNR in dB of uint8 images (n, C, H, W) against truth, each image's, averaged: 10 log10(255² / MSE)."""
    mse = (x.float() - truth.float()).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(255 ** 2 / mse)).mean().item()


def measures(results, truth, cond, command, factor):
    """The line printed when the truth is known: the results' PSNR beside the input's (bicubic, or the grey image), and
    for upscale the consistency: the result downsampled again against the low-resolution input."""
    truth8 = to_uint8(truth)
    result = psnr(to_uint8(results), truth8)
    line = f"PSNR against the truth, mean of {len(truth)}: the result {result:.2f} dB"
    if command == "colorize":
        return f"{line}, the grey input {psnr(to_uint8(cond.expand_as(truth)), truth8):.2f} dB"
    line += f", bicubic {psnr(to_uint8(cond), truth8):.2f} dB"
    low = to_uint8(F.avg_pool2d(truth, factor))
    again = to_uint8(F.avg_pool2d(results.clamp(-1, 1), factor))
    return f"{line}; consistency (the result area-downsampled ×{factor} against the input): {psnr(again, low):.2f} dB"


def restore(run, path, n, seed, name, command, out):
    """`upscale` or `colorize` (command) of IMAGE|FOLDER (path) with run's model: n results, into out (a PNG of rows:
    the input, bicubic for upscale, the result, the truth if known; or a folder/ of the results alone)."""
    cond, truth, shown, labels = task_inputs(path, run, n, seed, name, command)
    results = []

    def kept(batches):  # the results, also kept for the measures
        for batch in batches:
            results.append(batch)
            yield batch

    columns = {"input": shown}  # the results go in as None
    if command == "upscale":
        columns["bicubic"] = cond
    columns["result"] = None
    if truth is not None:
        columns["truth"] = truth

    def rows(x):
        tiles = [x if c is None else c for c in columns.values()]
        return pictures.editing_strip([[to_uint8(c[i]) for c in tiles] for i in range(len(x))], list(columns))
    batches = kept(draw(run, n, y=labels, cond=cond))
    code = write_samples(run, out, seed, f"{command}.png", batches, rows, f"results of {command}")
    if truth is not None:
        print(measures(torch.cat(results), truth, cond, command, run.cfg["factor"]), file=sys.stderr)
    return code
