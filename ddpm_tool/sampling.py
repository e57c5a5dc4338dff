"""
sampling.py: sampling from a checkpoint. The loader (a checkpoint, an export or a diffusers model, found or named),
the sampler's options from its flags and the defaults for the device and model, the labels of a grid, one batched
loop for every command that samples, how its samples are written, the reverse and forward processes, the inputs of
the editing commands, and FID's reference and network.
"""
import glob
import itertools
import math
import os
import sys
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from tqdm import tqdm

import ddpm

from . import convert, fid
from .data import class_rows, decode_images, load_images, random_subset, resize_crop, to_uint8, viewed
from .devices import autocast, get_device, resolve_precision
from .pictures import grid
from .runs import UserError, cache_dir, ensure_writable, hw, is_hub_id, read_checkpoint, save_atomic, unet_from_config


def load_checkpoint(path, mmap=False):
    """A checkpoint or export file (runs.read_checkpoint), or a diffusers model, a folder or a hub id owner/name
    (convert.load_diffusers) → a checkpoint's dict, its config complete; or UserError."""
    if os.path.isdir(path) or (is_hub_id(path) and not path.endswith(".pt")):
        return convert.load_diffusers(path)
    return read_checkpoint(path, mmap)


def find_checkpoint(ckpt):
    """--ckpt, else the newest runs/*/ckpt.pt, else the model bundled beside ddpm.py (with a note), or UserError."""
    path = ckpt or max(glob.glob("runs/*/ckpt.pt"), key=os.path.getmtime, default=None)
    if path is None:  # a fresh clone: the small CIFAR-10 model that ships in samples/
        path = os.path.join(os.path.dirname(os.path.abspath(ddpm.__file__)), "samples", "cifar10_small.pt")
        if not os.path.isfile(path):
            raise UserError("no checkpoint found in runs/*/ckpt.pt: train one first, or pass --ckpt")
        print(f"no runs/*/ckpt.pt: sampling from the bundled CIFAR-10 model {path}", file=sys.stderr)
    return path


SAMPLERS = {"ancestral": (None, "uniform"), "ddim": (25, "uniform"), "dpm++": (10, "quadratic")}  # steps, spacing


def sampler_options(device, model_eta, T, sampler, steps, spacing, eta, guidance, deterministic=False, resample=1):
    """The sampler's flags (--sampler, --steps: 0 for all, --spacing, --eta, --guidance; None where not given) →
    Diffusion.sample's keywords (which refuses what it can't), with the defaults for the device and the model (its
    train --eta, model_eta; its T steps). deterministic: interpolate's; resample: RePaint's R."""
    defaults = [  # --sampler where it is not given: the first that holds
        (steps == 0, "ancestral"),  # --steps all
        (bool(steps), "ddim"),  # --steps N alone
        (deterministic, "dpm++"),  # interpolate: each sample a function of its noise
        (resample > 1, "ddim"),  # RePaint's resampling needs noise; measured with DDIM 25 steps, η = 1 (docs/)
        (device.type != "cpu", "ancestral"),  # a GPU: the paper's Algorithm 2
        (bool(model_eta), "ddim"),  # train --eta > 0: a deterministic solver leaves speckle on MNIST's digits
        (True, "dpm++")]  # a CPU, where 1000 steps take an hour: 10 steps as good as DDIM's 25 (docs/measurements.md)
    sampler = sampler or next(sampler for holds, sampler in defaults if holds)
    if steps is not None and steps > T:
        raise UserError(f"--steps {steps}: the model has only T = {T} steps")
    if deterministic and (sampler == "ancestral" or eta):
        raise UserError("interpolate needs a deterministic sampler: --sampler dpm++, or ddim with --eta 0")
    if eta and sampler != "ddim":
        raise UserError(f"--eta {eta}: only --sampler ddim takes it ({sampler} draws its own noise or none)")
    if spacing and sampler == "ancestral":
        raise UserError("--spacing: --sampler ancestral visits all T steps; use ddim or dpm++")
    own_steps, own_spacing = SAMPLERS[sampler]
    if steps == 0:  # --steps all
        steps = None
    elif steps is None and own_steps:
        steps = min(own_steps, T)
    if eta is None and not deterministic:  # by default the model's own (train --eta); RePaint's: as measured
        eta = 1.0 if resample > 1 else model_eta
    return dict(guidance=guidance, steps=steps, eta=eta or 0.0, sampler=sampler, spacing=spacing or own_spacing)


# A checkpoint loaded to sample or to score (load_run): the device, its path, the EMA U-Net (model), its Diffusion,
# class names and config, the shape (C, H, W) of its images, the precision; to sample, Diffusion.sample's keywords
# (options), the batch size and whether to compile (None: for long runs on CUDA), which the command line adds.
Run = namedtuple("Run", "device path model diffusion classes cfg shape precision options batch_size compile",
                 defaults=(None, None, None))


def load_run(ckpt=None, device=None, precision="auto", task="sample", check=None):
    """A checkpoint (--ckpt, found by find_checkpoint) loaded on a device (None: the best found) → a Run: its EMA U-Net
    in eval mode and its Diffusion, with `precision` resolved for `task` ("sample", "nll"). check(config, path): what
    the command line checks in a config before anything is built of it."""
    device = get_device(device)
    path = find_checkpoint(ckpt)
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    if check is not None:
        check(cfg, path)
    model = unet_from_config(cfg, len(ckpt["classes"]))
    model.load_state_dict(ckpt["ema"]["model"])
    model.to(device, memory_format=torch.contiguous_format if device.type == "mps" else torch.channels_last).eval()
    diffusion = ddpm.Diffusion(cfg["timesteps"], cfg["schedule"], cfg["variance"], device, cfg["prediction"])
    shape = (cfg["channels"], *hw(cfg["image_size"]))
    return Run(device, path, model, diffusion, ckpt["classes"], cfg, shape, resolve_precision(precision, device, task))


def class_labels(run, n, rows, name=None):
    """The labels of n samples → (labels or None, images a row, the name for the output): the class `name` (--class:
    a name, or an index), else the classes in turn (rows: whole rows of a grid, n rounded up; else exactly n), or
    None for an unconditional model."""
    classes = run.classes
    nrow = math.ceil(math.sqrt(n))
    if run.cfg["unconditional"]:
        if name is not None:
            raise UserError(f"--class: {run.path} is an unconditional model")
        return None, nrow, "all"
    if name is None:
        labels, per = class_rows(len(classes), n)
        return labels if rows else labels[:n], per, "all"
    index = {str(i): i for i in range(len(classes))} | {c: i for i, c in enumerate(classes)}  # names first
    if name not in index:
        raise UserError(f"--class {name}: unknown; choose from {', '.join(classes)} (or 0-{len(classes) - 1})")
    return torch.full((n,), index[name]), nrow, classes[index[name]]


def _rows(value, rows, device):
    """value[rows] on device for a tensor (also inside a tuple: inpainting's known), else value itself."""
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, device) for v in value)
    if isinstance(value, torch.Tensor):
        return value[rows].to(device)
    return value


def sample_batches(model, diffusion, n, batch_size, pad=False, progress=False, **kwargs):
    """Yields n samples of Diffusion.sample(model, …, **kwargs) in batches on the CPU; a tensor of n rows among kwargs
    (y, noise, image, known's) is sliced along. pad: a last batch drawn whole and cut, for a compiled model."""
    device = next(model.parameters()).device
    spoilt = 0
    for start in tqdm(range(0, n, batch_size), "batches", leave=False, disable=True if n <= batch_size else None):
        size = batch_size if pad else min(batch_size, n - start)
        batch = {name: _rows(value, torch.arange(start, start + size) % n, device) for name, value in kwargs.items()}
        try:
            x = diffusion.sample(model, size, progress=progress, **batch)
        except ValueError as e:  # its refusals: a sampler and steps that do not go together
            raise UserError(str(e)) from None
        x = x[:n - start].float().cpu()
        spoilt += int((~x.isfinite()).flatten(1).any(1).sum())
        yield x
    if spoilt:  # a NaN quantises to black: say so rather than leave black images unexplained
        print(f"note: {spoilt} of {n} samples hold NaN or inf (black in a PNG): the model's weights are not finite, or "
              "bf16 overflowed (try --precision fp32)", file=sys.stderr)


def draw(run, n, **per_image):
    """sample_batches of run's model with run's sampler: n samples, compiled for long runs (or as --compile says)."""
    compiled = run.compile
    if compiled is None:  # compiling takes ~30 s on an H100: for long runs only
        steps = run.options["steps"] or run.diffusion.num_timesteps
        compiled = run.device.type == "cuda" and n * steps >= 200_000
    model = torch.compile(run.model) if compiled else run.model
    return sample_batches(model, run.diffusion, n, run.batch_size, compiled, n <= run.batch_size, **run.options,
                          **per_image)


def describe(run):
    """The sampler in words, as the sampling commands report it."""
    options = run.options
    steps = options["steps"] or run.diffusion.num_timesteps
    spacing = "" if options["spacing"] == "uniform" else f" ({options['spacing']})"
    words = {"ancestral": f"ancestral {steps} steps", "dpm++": f"DPM-Solver++(2M) {steps} steps{spacing}",
             "ddim": f"DDIM {steps} steps{spacing}, eta {options['eta']}"}
    return words[options["sampler"]]


def is_folder(out):  # an --out for a PNG each
    return out.endswith(("/", os.sep)) or os.path.isdir(out)


def sample_out(out, default):
    """--out, by default outputs/<default> (not samples/) → (the path, whether a folder for a PNG each), writable."""
    out = out or os.path.join("outputs", default)
    per_file = is_folder(out)
    ensure_writable(out if per_file else os.path.dirname(out) or ".", "--out")
    return out, per_file


def write_samples(run, out, seed, default, batches, picture, what):
    """How every sampling command ends: the samples of `batches`, drawn from `seed`, into --out (sample_out): a PNG each
    in a folder/, written while sampling goes on, or picture(all of them), a PIL image, in one file; then its line."""
    out, per_file = sample_out(out, default)
    torch.manual_seed(seed)
    with autocast(run.device, run.precision):
        if per_file:
            images = (image for batch in batches for image in batch)
            with ThreadPoolExecutor(8) as pool:  # map takes each sample as it comes; its threads write <i>.png
                written = pool.map(lambda i, x: save_atomic(f"{out}/{i:06d}.png", grid(to_uint8(x[None]), 1).save),
                                   itertools.count(), images)
                count = len(list(written))
        else:
            x = torch.cat(list(batches))
            save_atomic(out, picture(x).save)
            count = len(x)
    if count == 1:  # "1 sample", "1 result of inpaint"
        what = what.replace("samples", "sample").replace("results", "result")
    guidance = "" if run.cfg["unconditional"] else f", guidance {run.options['guidance']}"
    print(f"wrote {count} {what} ({describe(run)}{guidance}, {run.precision}) from {run.path} to {out}",
          file=sys.stderr)
    return 0


def reverse_process(model, diffusion, n, frames=10, **kwargs):
    """Sample n images in one batch → (images, [(t, x_t, x̂_0)] at `frames` steps evenly spaced over the sampler's,
    from its first (t = T − 1, x_t the start noise) to its last (t = 0, x̂_0 the images)), all on the CPU."""
    ts = diffusion.sampling_steps(kwargs.get("steps"), kwargs.get("spacing", "uniform"))[::-1]  # as it visits them
    keep = {ts[j] for j in torch.linspace(0, len(ts) - 1, min(frames, len(ts))).round().long().tolist()}
    kept = []

    def record(t, x_t, x0):
        if t in keep:
            kept.append((t, x_t.float().cpu(), x0.float().cpu()))
    return diffusion.sample(model, n, callback=record, **kwargs).float().cpu(), kept


def forward_process(x0, noise, diffusions, columns=10):
    """x_t ~ q(x_t | x_0) (Eq. 4) of images x0 (N, C, H, W) at `columns` evenly spaced t from 0 to T − 1 → (rows
    (N · len(diffusions), columns, C, H, W): for each image a row for each of the Diffusions, one ε = noise[i] along
    them; the t of the columns)."""
    ts = torch.tensor(diffusions[0].sampling_steps(columns))  # the t a `columns`-step DDIM sampler visits
    rows = torch.stack([d.q_sample(x.expand(columns, *x.shape), ts, eps.expand(columns, *eps.shape))
                        for x, eps in zip(x0, noise) for d in diffusions])
    return rows, ts.tolist()

def edit_inputs(path, run, n, seed, name=None, command="inpaint", size=None, channels=None):
    """IMAGE|FOLDER (path) of inpaint and img2img at the model's size (or `size`), in [-1, 1]: the image, or a random n
    of the folder's (drawn with seed) → (images (k, C, H, W), the labels of the n results or None, the index of each
    result's image, in turn). Labels: the class `name` (--class), else each image's own if its folder is named as a
    class of the model's (CIFAR-10's test set), else none. channels: the counts taken (default: the model's)."""
    cfg = run.cfg
    labels = None
    size = size or cfg["image_size"]
    if os.path.isfile(path):
        images = decode_images([path], size, 1)
    elif os.path.isdir(path):
        pick = random_subset(n, seed)
        images, folder_labels, names = load_images(path, image_size=size, pick=pick, flag=command)
        if set(names) <= set(run.classes) and not cfg["unconditional"]:
            labels = torch.tensor([run.classes.index(names[c]) for c in folder_labels.tolist()])
    else:
        raise UserError(f"{command} {path}: no such file or folder")
    kinds = {1: "grey", 3: "colour"}
    if images.shape[1] not in (channels or [cfg["channels"]]):
        raise UserError(f"{command} {path}: {kinds[images.shape[1]]} images; the model makes "
                        f"{kinds[cfg['channels']]} ones")
    if name is not None:
        labels = class_labels(run, len(images), False, name)[0]
    index = torch.arange(n) % len(images)
    return images.float() / 127.5 - 1, None if labels is None else labels[index], index


def load_mask(path, size, image=None):
    """--mask: a PNG, white where the model paints, of the model's size, or of inpaint's image (then resized and
    cropped as it is) → (1, 1, H, W): 1 where a pixel is known. None: the centre, half of each side."""
    import torchvision.transforms.functional as TF
    H, W = hw(size)
    known = torch.ones(1, 1, H, W)
    if path is None:
        known[..., H // 4:H // 4 + H // 2, W // 4:W // 4 + W // 2] = 0
        return known
    try:
        with Image.open(path) as im:
            mode = im.mode
            mask = viewed(im)
    except Exception as e:
        raise UserError(f"--mask {path}: cannot read it as an image ({type(e).__name__})") from None
    if mask is None:  # as decode_images says it
        raise UserError(f"--mask {path}: mode {mode}: no range to show it in 8 bits")
    mask = mask.convert("L")
    sizes = [(W, H)]  # PIL's (width, height)
    if image is not None and os.path.isfile(image):
        with Image.open(image) as im:
            sizes.append(im.size)
    if mask.size not in sizes:
        wanted = " or ".join(f"{w}×{h}" for w, h in dict.fromkeys(sizes))
        raise UserError(f"--mask {path}: {mask.size[0]}×{mask.size[1]} pixels; it must be {wanted} (width × height)")
    return (TF.pil_to_tensor(resize_crop(mask, size, nearest=True))[None] < 128).float()

def fid_reference(net, ref, root, image_size, n=None, workers=4, channels=None):
    """fid.reference_stats of --ref: an .npz with mu and sigma, or cifar10, mnist, an image folder decoded as training
    decodes it at image_size (all its images or a fixed random n), their statistics cached in cache_dir("fid")."""
    def decode(ref):
        pick = random_subset(n, 0, "--ref-n")
        return load_images(ref, root, image_size, workers, pick, flag="--ref")[0]
    return fid.reference_stats(net, ref, decode, cache_dir("fid"), channels)


def inception(path, device):
    """FID's Inception network: weights from --inception, else $DDPM_INCEPTION, else downloaded once."""
    try:
        return fid.load_inception(path or os.environ.get("DDPM_INCEPTION"), device)
    except fid.FIDError as e:
        raise fid.FIDError(f"{e}; offline, pass --inception PATH to a local copy (or set DDPM_INCEPTION)") from None
