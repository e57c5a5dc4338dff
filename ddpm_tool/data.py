"""
data.py: the training images, decoded once into memory as uint8 (N, C, H, W): from an image folder (<folder>/<class>/
*.png|jpg, or flat), cached outside it, or from torchvision's cifar10, mnist and fashion-mnist; resized to cover the
image size and centre-cropped; and the batches of a step, a pure function of the seed and the step.
"""
import math
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .runs import UserError, cache_dir, hw, save_atomic


def to_uint8(x):
    """[-1, 1] → uint8 pixels, quantised as a PNG of it stores them (torchvision's rounding): FID scores those."""
    return ((x.float() + 1) / 2).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)




def degrade(x, task, factor):
    """The image c a conditioned model is given, made from its target x (B, C, H, W) in [-1, 1] as its training pairs
    are: "upscale" (SR3): x area-downsampled by factor, brought back to full size bicubically; "colorize" (Palette): x
    in grey, one channel (ITU-R 601 luma, as PIL's convert("L"))."""
    if task == "colorize":
        luma = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype)
        return (x * luma.view(1, 3, 1, 1)).sum(1, keepdim=True)
    return bicubic(F.avg_pool2d(x, factor), factor)


def bicubic(low, factor):
    """Low-resolution images (B, C, h, w) in [-1, 1] at factor times the size: bicubic, clipped (SR3's c, and the
    baseline a super-resolution model must beat)."""
    return F.interpolate(low, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)


def resize_crop(image, size, nearest=False):
    """A PIL image, or images (…, h, w), resized to cover `size` (S or (H, W)) and centre-cropped to it: another
    aspect ratio loses its edges along the longer way, never stretched. S alone: the shorter side to S."""
    import torchvision.transforms.functional as TF
    H, W = hw(size)
    w, h = TF.get_image_size(image)
    cover = [H, int(w * H / h)] if H * w >= W * h else [int(h * W / w), W]  # the side that binds gets its size
    mode = TF.InterpolationMode.NEAREST if nearest else TF.InterpolationMode.BILINEAR
    return TF.center_crop(TF.resize(image, cover, mode, antialias=True), [H, W])


def random_subset(n, seed, flag="--n"):
    """A `pick` for load_images: a random n of the N images, drawn with a generator seeded with seed, or with seed
    itself if it is a torch.Generator (n None: all; n > N: UserError)."""
    if n is None:
        return None
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)

    def pick(total):
        if n > total:
            raise UserError(f"{flag} {n}: the data has only {total} images")
        return torch.randperm(total, generator=generator)[:n]
    return pick



def class_rows(num_classes, n):
    """Labels for a grid with one row per class, about n images in all → (labels, images per row)."""
    per = max(1, math.ceil(n / num_classes))
    return torch.arange(num_classes).repeat_interleave(per), per


EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif")  # what a folder's images may be


def image_files(data, extensions=EXTENSIONS):
    """A folder's images by class: {data/<class>: [its images, sorted]} for the subfolders holding any, else {data: the
    images in data itself}."""
    def images_in(folder):
        return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.lower().endswith(extensions)]
    subfolders = [os.path.join(data, d) for d in sorted(os.listdir(data)) if not d.startswith(".")]
    by_class = {d: images_in(d) for d in subfolders if os.path.isdir(d)}
    return {d: found for d, found in by_class.items() if found} or {data: images_in(data)}  # a cache: no class


def load_images(data, root="./data", image_size=32, workers=4, pick=None, flag="--data", cache=False,
                extensions=EXTENSIONS, train=True):
    """→ (images uint8 (N, C, H, W), labels (N,), class names) of "cifar10", "mnist", "fashion-mnist" (downloaded into
    root; train: the training split, else the test split) or a folder data/<class>/*.png|jpg (or data/*.png), decoded
    now: a bad file is refused before training. C = 1 if all are grey, else 3; resize_crop to image_size, S or
    (H, W) (None: the first image's short side). pick(N) → the indices kept, before decoding. flag: what messages
    call `data`."""
    sets = {"cifar10": "CIFAR10", "mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
    if data in sets:
        return torchvision_images(data, sets[data], root, image_size, pick, train)
    if not os.path.isdir(data):
        raise UserError(f"{flag} {data}: no such folder (use {', '.join(sets)} or a folder <folder>/<class>/*.png)")
    by_class = image_files(data, extensions)
    classes = [os.path.basename(os.path.normpath(d)) for d in by_class]
    files = [(f, i) for i, found in enumerate(by_class.values()) for f in found]
    if not files:
        raise UserError(f"{flag} {data}: no images ({', '.join(extensions)}) in {data}/<class>/ or {data}/")
    files = files if pick is None else [files[i] for i in pick(len(files))]
    if image_size is None:
        with Image.open(files[0][0]) as im:
            image_size = min(im.size)
    paths, labels = [f for f, _ in files], torch.tensor([y for _, y in files])
    if cache and pick is None:
        return cached_images(data, paths, image_size, workers), labels, classes
    return decode_images(paths, image_size, workers), labels, classes


def torchvision_images(data, name, root, image_size, pick=None, train=True):
    """load_images of torchvision's data set `name` (its training or test split), downloaded into root."""
    import torchvision
    made = not os.path.exists(root)
    try:
        ds = getattr(torchvision.datasets, name)(root, train=train, download=True)
    except Exception as e:  # no network, full disk: say so in one line, and leave no folder of ours behind
        if made:
            shutil.rmtree(root, ignore_errors=True)
        copy = "cifar-10-batches-py" if data == "cifar10" else f"{name}/raw"  # where torchvision looks for it
        raise UserError(f"could not get {data} into {root} ({str(e).splitlines()[0]}); offline, pass --data-root a "
                        f"folder holding a copy as torchvision lays it out ({copy}/), or --data a folder of its images")
    keep = slice(None) if pick is None else pick(len(ds.data))
    images = torch.as_tensor(ds.data)[keep]  # CIFAR-10: (N, 32, 32, 3); MNIST: (N, 28, 28), grey
    images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2).contiguous()
    if hw(image_size) != images.shape[-2:]:
        images = resize_crop(images, image_size)
    # Names to type after --class: "7 - seven" → "7", "T-shirt/top" → "t-shirt", "Ankle boot" → "ankle-boot"
    classes = [c.split(" - ")[0].split("/")[0].lower().replace(" ", "-") for c in ds.classes]
    return images, torch.as_tensor(ds.targets)[keep], classes


def viewed(im):
    """A PIL image as a viewer shows it, 8 bits a channel: "L" for grey ones, 16-bit grey scaled down (0..65535 →
    0..255), else "RGB"; anything transparent over white. None for a mode with no range to scale: 32-bit floats, or
    integers past 16 bits."""
    if im.mode == "F":
        return None
    if im.mode.startswith("I"):  # "I;16…" (16-bit PNGs, TIFFs), or "I" holding 16-bit values
        grey = np.asarray(im, np.int64)
        if grey.min() < 0 or grey.max() > 65535:
            return None
        return Image.fromarray(((grey * 255 + 32767) // 65535).astype(np.uint8))
    mode = "L" if im.mode in ("1", "L", "LA", "La") else "RGB"
    if im.has_transparency_data:  # alpha, or a transparent colour (palettes, PNG's tRNS)
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im.convert(mode)


def decode_images(paths, image_size, workers=4):
    """Image files → uint8 (N, C, H, W), each as a viewer shows it (viewed), resized to cover image_size and
    centre-cropped, decoded in threads (PIL releases the GIL); C = 1 if every image is grey, else 3, grey images
    repeated into R, G and B. Every file that cannot be read is named, the first three of them, in one UserError."""
    import torchvision.transforms.functional as TF

    def decode(path):  # → the image, or why not
        try:
            with Image.open(path) as im:
                image = viewed(im)
                if image is None:
                    return f"mode {im.mode}: no range to show it in 8 bits"
                return TF.pil_to_tensor(resize_crop(image, image_size))
        except Exception as e:
            return type(e).__name__
    with ThreadPoolExecutor(workers) as pool:
        images = list(tqdm(pool.map(decode, paths), "loading", len(paths), leave=False, disable=None))
    bad = [f"{path} ({why})" for path, why in zip(paths, images) if isinstance(why, str)]
    if len(bad) == 1:
        raise UserError(f"cannot read image {bad[0]}; fix or remove it")
    if bad:
        more = ", …" if len(bad) > 3 else ""
        raise UserError(f"cannot read {len(bad)} images: {', '.join(bad[:3])}{more}; fix or remove them")
    channels = max(len(x) for x in images)
    return torch.stack([x.expand(channels, -1, -1) for x in images])


def cached_images(data, paths, image_size, workers=4):
    """decode_images of the folder data, kept in cache_dir("images")/images-<hash>.npy and mapped later. The hash
    covers the folder, each file's name, size and time and the image size: a changed folder is decoded anew. A damaged
    cache is decoded anew, one that cannot be written is skipped with a note: a cache is never a reason to stop."""
    import hashlib
    made_of = [(os.path.relpath(f, data), s.st_size, s.st_mtime_ns) for f, s in ((f, os.stat(f)) for f in paths)]
    key = hashlib.sha256(repr((os.path.abspath(data), image_size, made_of)).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir("images"), f"images-{key}.npy")
    try:  # mapped, not read: pages come from disk as batches touch them (copy-on-write, so torch may index it)
        images = torch.from_numpy(np.load(path, mmap_mode="c"))
        if images.shape[0] == len(paths) and images.shape[1] in (1, 3) and images.shape[2:] == hw(image_size):
            return images
    except Exception:  # none yet, or truncated or damaged: decoded anew
        pass
    images = decode_images(paths, image_size, workers)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_atomic(path, lambda f: np.save(f, images.numpy()))  # whole or not at all
    except Exception as e:
        print(f"note: the decoded images are not cached in {os.path.dirname(path)} "
              f"({getattr(e, 'strerror', None) or e}); they are decoded again next time", file=sys.stderr)
    return images



def batch_indices(n, batch_size, seed, step):
    """Indices of the batch for `step`: epoch e is a permutation seeded by (seed, e), so the data order is a
    pure function of the step, and a resumed run sees exactly the batches the uninterrupted one would."""
    out, pos = [], step * batch_size
    while pos < (step + 1) * batch_size:  # a batch may straddle epochs (or span several for tiny datasets)
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))  # 50k: 0.4 ms
        out.append(perm[i:i + (step + 1) * batch_size - pos])
        pos += len(out[-1])
    return torch.cat(out)

