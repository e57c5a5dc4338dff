"""
flags.py: the command line's flags: argparse types that refuse a bad value in one line, the rows (flag, kind,
[default,] help) several commands share and train's, how rows become options, and the check a config read from a file
goes through as train's flags would check it. The commands, each with the rows of its own, are cli.py's.
"""
import argparse
import os
import sys

from .runs import DEFAULTS, PRESETS, UserError
from .sampling import SAMPLERS, is_folder


TRACKERS = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}  # --report-to: the module each needs


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + line
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def number(kind, lo, hi, lo_open=False):
    """argparse type: a `kind` number in [lo, hi] (or (lo, hi])."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {'whole ' if kind is int else ''}number") from None
        if not ((lo < value) if lo_open else (lo <= value)) or not value <= hi:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if lo_open else '['}{lo}, {hi}]")
        return value
    return parse


def numbers(kind, lo, hi, least=1):
    """argparse type: comma-separated numbers, each in [lo, hi], at least `least`: "1,2,2" → (1, 2, 2); "" → () if
    least is 0, else refused."""
    def parse(text):
        values = tuple(number(kind, lo, hi)(v) for v in text.split(",") if v.strip())
        if len(values) < least:
            raise argparse.ArgumentTypeError(f"{text!r}: no number; give one, or several comma-separated")
        return values
    return parse


def picture_out(text):  # where a command writes pictures: NAME.png, or a folder/ for a PNG each, that can be written
    folder = is_folder(text)
    if not folder and not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"{text!r}: write a PNG (NAME.png), or a folder/ with a PNG each")
    place = os.path.abspath(text if folder else os.path.dirname(text) or ".")
    while not os.path.exists(place):  # the folder it goes into, or the nearest one there is on the way
        place = os.path.dirname(place)
    if not os.path.isdir(place) or not os.access(place, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: cannot write into {place}")
    return text


def image_sizes(text):  # "32" → 32; "16,32" → (16, 32): height, width
    sides = numbers(int, 4, 4096)(text)
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: a side, or height,width")
    return sides[0] if len(set(sides)) == 1 else sides


# The kinds of number several flags take
COUNT = number(int, 1, 10 ** 9)  # steps, intervals
EVERY = number(int, 0, 10 ** 9)  # an interval, or 0: never
SOME = number(int, 1, 10 ** 5)  # results, steps, terms
SUBSET = number(int, 2, 10 ** 7)  # a random subset of images (2: a covariance)
FRACTION = number(float, 0, 1)


def factor(text):  # --factor: 2, 4 or 8
    value = number(int, 2, 8)(text)
    if value not in (2, 4, 8):
        raise argparse.ArgumentTypeError(f"{text}: 2, 4 or 8")
    return value


def step_count(text):  # "all" → 0 (every step), else a whole number of steps
    return 0 if text == "all" else SOME(text)


def tracker_names(text):  # "tensorboard,wandb" → ("tensorboard", "wandb"); "none" → ()
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip() not in ("", "none")))
    if set(names) - set(TRACKERS):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(TRACKERS)} (comma-separated) or none")
    return names


def add_options(parser, rows, given_only=False):
    """rows of (flag, kind, default, help), or of (flag, kind, help) for a flag without a default of its own: a run
    config's key takes its default (runs.DEFAULTS), any other flag None. kind: a type, a tuple of choices, "switch" or
    "on/off" (--x and --no-x); default ...: required. given_only (train): None where not given, so that a resumed run
    keeps its own."""
    for flag, kind, *value, text in rows:
        value = value[0] if value else DEFAULTS.get(flag[2:].replace("-", "_"))
        default = None if given_only else value
        if not flag.startswith("-"):  # a positional argument: its kind is its name in the usage line
            parser.add_argument(flag, metavar=kind, help=text)
            continue
        if kind == "switch":
            kw = dict(action="store_true")
        elif kind == "on/off":
            kw = dict(action=argparse.BooleanOptionalAction)
        elif isinstance(kind, tuple):
            kw = dict(choices=kind)
        else:
            kw = dict(type=kind)
        if isinstance(value, tuple):  # as it is typed: 1,2,2,2
            value = ",".join(map(str, value)) or None
        parser.add_argument(flag, default=default, required=default is ..., **kw,
                            help=text + ("" if value in (None, ...) else f" (default: {value})"))


# The flags several commands share, each declared once
SEED = ("--seed", number(int, 0, 2 ** 62), "random seed")
RUN = [  # every command that runs the network
    ("--device", str, "cuda, cuda:N, mps or cpu (default: the best found)"),
    ("--precision", ("auto", "fp32", "bf16"), "auto: bf16 autocast on CUDA, and to sample on a CPU that "
     "computes bf16 natively (AMX, AVX512-BF16); fp32 to train on a CPU and for nll (L_0 needs more than bf16)"), SEED,
    ("--batch-size", number(int, 1, 65536), None, "images a training step (train: 128), or a batch (to sample: 1,024 "
     "on CUDA, else 16; nll's (image, t) pairs: 1,024 or 64)")]
CKPT = ("--ckpt", str, "checkpoint, export or diffusers model (default: newest runs/*/ckpt.pt, else bundled)")
COMPILE = ("--compile", "on/off", "torch.compile (default: on CUDA to train, and where samples × steps ≥ 2e5)")
SAMPLER = [CKPT, COMPILE,  # every command that samples
           ("--class", str, "class name or index (default: every class in turn; to edit, an image's own where "
            "its folder is named as one of the model's, else none)"),
           ("--guidance", number(float, 0, 100), 2.0, "guidance s: 1 = conditional, 0 = unconditional"),
           ("--steps", step_count, None, "the sampler's steps, or all T (alone: N samples with DDIM, all ancestrally)"),
           ("--eta", FRACTION, None, "DDIM noise: 0 deterministic, 1 DDPM-like (default: the model's)"),
           ("--sampler", tuple(SAMPLERS), "ancestral (Algorithm 2), DDIM, or DPM-Solver++(2M) (default: "
            "ancestral on a GPU; on a CPU dpm++, 10 steps, or ddim, 25, for a model of train --eta > 0)"),
           ("--spacing", ("uniform", "quadratic", "logsnr"), "the steps' spacing: uniform or quadratic in t, "
            "uniform in log-SNR (default: dpm++ quadratic, ddim uniform)")]
OUT = ("--out", picture_out, "a PNG, or a folder/ for a PNG each (default: outputs/<class or command>.png)")
INPUT = ("input", "IMAGE|FOLDER", ..., "an image, or a folder of images (<folder>/<class>/*.png|jpg, or *.png|jpg)")
DATA_ROOT = ("--data-root", str, "where cifar10, mnist and fashion-mnist are downloaded (decoded images and "
             "FID statistics are cached in $DDPM_CACHE, by default ~/.cache/ddpm: set it to move them)")
WORKERS = ("--num-workers", number(int, 1, 256), "decoding threads")
INCEPTION = ("--inception", str, "Inception's weights, for offline use (default: $DDPM_INCEPTION, else fetched)")
JSON = ("--json", "switch", "print the result as one JSON object")


TRAIN = RUN + [DATA_ROOT, WORKERS, INCEPTION, COMPILE] + [  # a run's config: their defaults in runs.DEFAULTS
    ("--data", str, "cifar10, mnist, fashion-mnist, or an image folder <folder>/<class>/*.png|jpg"),
    ("--image-size", image_sizes, "side in pixels, or height,width (default: the data's own if the U-Net can, else "
     "32): images are resized to cover it and centre-cropped, never stretched"),
    ("--out", str, "run folder: ckpt.pt, log.txt, progress.png, samples_*.png (default: runs/<data name>)"),
    ("--steps", COUNT, "training steps"), ("--warmup", EVERY, "warm-up steps"),
    ("--lr", number(float, 0, 1, True), "Adam's learning rate"),
    ("--grad-clip", number(float, 0, 1e6, True), "the gradient's norm is clipped to this"),
    ("--ch", number(int, 8, 4096), "base channels"), ("--num-res-blocks", number(int, 1, 64), "blocks a level"),
    ("--ch-mult", numbers(int, 1, 4096), "channels per level, e.g. 1,2,2"),
    ("--attn-res", numbers(int, 1, 4096, 0), "resolutions with self-attention, e.g. 16 or 16,8 ('' for none); "
     "a map counts by its shorter side, so H×W gets attention where a square image of side min(H, W) would"),
    ("--dropout", number(float, 0, 0.99), "dropout"), ("--ema-decay", FRACTION, "EMA decay"),
    ("--timesteps", number(int, 2, 100_000), "diffusion steps T"),
    ("--schedule", ("linear", "cosine"), "noise schedule"),
    ("--p-uncond", FRACTION, "probability of the null label in training (for guidance)"),
    ("--eta", FRACTION, "DDIM noise for this model's samples (previews, `sample`'s default); 1 cleans "
     "up an undertrained model's samples"),
    ("--save-every", COUNT, "save interval"), ("--log-every", COUNT, "log interval"),
    ("--keep-every", EVERY, "also keep ckpt_<step>.pt every N steps (0: only the last)"),
    ("--sample-every", EVERY, "EMA sample grid interval (0: never)"),
    ("--fid-every", EVERY, "FID of the EMA model into log.txt every N steps (0: never)"),
    ("--fid-n", number(int, 2, 10 ** 6), "samples for that FID (DDIM as the previews)"),
    ("--fid-ref", str, "FID reference as `fid --ref` takes it (default: the training images)"),
    ("--micro-batch", number(int, 1, 65536), "images through the network at a time, gradients accumulated "
     "over the batch: less memory, the same step (default: the whole batch)"),
    ("--grad-checkpoint", "switch", "activation checkpointing: each residual block keeps only its input and is "
     "redone in the backward pass: less memory, the same step, one more forward pass of time"),
    ("--init", str, "fine-tune: start from this checkpoint's or exported model's EMA weights and network, with "
     "a new optimizer, step and random streams"),
    ("--loss", ("l2", "l1", "huber"), "the loss on ε̂: l2 (Ho et al.'s Eq. 14), l1, huber (smooth L1, β = 1)"),
    ("--prediction", ("eps", "v", "x0"), "what the network predicts: ε (Ho et al.), v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) "
     "x_0 (Salimans & Ho: well-conditioned at both ends of the schedule), or x_0"),
    ("--task", ("generate", "upscale", "colorize"), "generate: p(x); upscale: super-resolution, p(x | c) for c the "
     "image area-downsampled by --factor, brought back bicubically (SR3); colorize: c the grey image (Palette). The "
     "pairs are made from the training images; the U-Net sees c beside x_t; sample with `upscale` or `colorize`"),
    ("--factor", factor, "upscale's: 2, 4 or 8"),
    ("--snr-gamma", number(float, 0, 1e6), "Min-SNR-γ loss weights (Hang et al.): each step weighted as min(SNR_t, γ) "
     "‖x_0 − x̂_0‖², so the easy low-noise steps stop dominating the gradient; 5 is theirs (0: Ho et al.'s)"),
    ("--report-to", tracker_names, "also log to tensorboard (<out>/tensorboard/), wandb ($WANDB_PROJECT, "
     "WANDB_MODE=offline), or both: tensorboard,wandb"),
    ("--flip", "on/off", "random horizontal flips (default: on, but off for --data mnist: turn them off for "
     "any digits, letters or text)"), ("--unconditional", "switch", "ignore the classes")]


TRAIN_ONLY = [("--preset", tuple(PRESETS), "paper", "paper: Ho et al.'s setup (the defaults shown); small: "
               + ", ".join(f"{k} {v}" for k, v in PRESETS["small"].items()) + "; flags override"),
              ("--resume", "switch", "continue the run in --out exactly where it stopped; of its flags only --steps, "
               "the intervals, --eta, --device, --precision, --compile, --data, --data-root, --out, --num-workers, "
               "--micro-batch, --grad-checkpoint, --report-to and the FID flags may change")]


def check_config(cfg, path, command=None):
    """A config read from a file (a checkpoint's, an export's, a diffusers folder's), each value a train flag sets
    checked as the flag checks it → cfg; else UserError naming the file and the key. command: the one that samples it,
    refused for a model of another --task."""
    for flag, kind, *_ in TRAIN:
        key = flag[2:].replace("-", "_")
        value = cfg.get(key)
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        try:
            not_bool = kind in ("switch", "on/off") and value not in (None, False, True)
            if not_bool or isinstance(kind, tuple) and value not in kind:
                raise argparse.ArgumentTypeError("not one it takes")
            if callable(kind) and value is not None:
                kind(text)
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{path}: its config's {key} is {value!r}, which {flag} refuses ({e})") from None
    task = cfg["task"]
    conditioned = command in ("upscale", "colorize")
    if command is not None and task != "generate" and command != task:
        raise UserError(f"{path}: a model of --task {task}, p(x | c), takes an image: use `python ddpm.py {task} "
                        f"IMAGE|FOLDER --ckpt {path}`")
    if conditioned and task != command:
        raise UserError(f"{path}: a model that generates (no --task); {command} needs one of --task {command}")
    return cfg
