"""
runs.py: what a run leaves on disk and reads back. The one error type (UserError), atomic saves, the run folder's
lock, the caches' folder, a run's config (its defaults, presets, and the keys older checkpoints lack: run_config
completes every config, new or saved) and checkpoints, read with weights_only=True.
"""
import errno
import glob
import os
import re
import shutil
import sys
import tempfile

import torch

from ddpm import UNet


class UserError(Exception):
    """A problem the user can fix: reported as one line on stderr, exit code `code`, no traceback. The errors of the
    tool's leaves (fid.FIDError, convert.ConvertError) are subclasses: the command line catches this class alone."""
    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


def missing(error, what):
    """The line for an ImportError: the tool imports an optional package only where it is used."""
    name = (error.name or str(error)).split(".")[0]
    return f"{what} needs {name}: pip install {name.replace('_', '-')}"


def save_atomic(path, write, durable=False):
    """write(file) into a temporary file beside `path`, then rename it to `path`: a crash leaves the old file or the
    new one, whole, and a failed write leaves nothing. durable (checkpoints): fsync the file and the rename too."""
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"  # the same extension: PIL reads the format from it
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except (RuntimeError, OSError) as e:  # torch.save reports a short write as RuntimeError ("unexpected pos"),
        if isinstance(e, OSError) and e.errno is not None:  # numpy as an OSError without errno: say what it is
            raise
        full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 1 << 20  # (the part written counts)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from None
        raise OSError(errno.EIO, f"the write failed ({type(e).__name__}: {str(e).strip()})", path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if durable:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(fd)  # make the rename itself durable
        os.close(fd)


def ensure_writable(folder, flag):
    """Create `folder` and prove it writable now, rather than fail after hours of training or sampling."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot write there ({e.strerror})") from None


def cache_dir(kind):
    """Where caches of `kind` ("images", "fid") live, as torch hub's and Hugging Face's do: $DDPM_CACHE/kind, else
    $XDG_CACHE_HOME/ddpm/kind, else ~/.cache/ddpm/kind; never inside a folder that is read as data."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.environ.get("DDPM_CACHE") or os.path.join(base, "ddpm"), kind)


def hold(folder):
    """Create the run folder (proved writable) and lock folder/.lock for the life of this process: flock, which the
    kernel drops when the process ends however it ends (SIGKILL, a power cut), so no stale lock blocks a resume.
    Then remove the temporary files a save killed midway left. → the open lock file (keep it), or None where the
    platform cannot lock (with a note)."""
    ensure_writable(folder, "--out")
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        import fcntl
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError) as e:  # held; or Windows, or a file system without locks (some network ones)
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        if getattr(e, "errno", None) in (errno.EAGAIN, errno.EACCES):
            raise UserError(f"--out {folder} is in use by another train, process {holder}: wait for it to end, or "
                            "train into another --out") from None
        why = getattr(e, "strerror", None) or "no file locks on this platform"
        print(f"note: {why}: keep a second run out of {folder}", file=sys.stderr)
        f = None
    else:  # the holder's process id, for a second run's message
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
    for stale in glob.glob(os.path.join(folder, "*.tmp[0-9]*")):  # left by a kill mid-save
        os.remove(stale)
    return f


def load_weights(path, mmap=False, unreadable="not a readable checkpoint, truncated or corrupt"):
    """torch.load with weights_only=True, so a crafted file cannot run code → its content, or UserError: a pickled
    Python object is refused by name, never unpickled; any other failure is `unreadable`. mmap: tensors read when
    used. Checkpoints, and the .bin weights of a diffusers folder, are read here only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # "Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y …"
        if found:
            raise UserError(f"{path}: refused, it holds a pickled Python object ({found[1]})") from None
        raise UserError(f"{path}: {unreadable} ({type(e).__name__})") from None


def is_hub_id(path):
    """A Hugging Face hub id owner/name, not a local path: its owner is no local folder."""
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", path)) and not os.path.exists(path.split("/")[0])


# ---- A run's config: every key and its default (`train --help` shows them beside the flags), the presets, and the
# ---- keys older checkpoints lack. run_config completes every config, a new run's or a saved one, here alone.
DEFAULTS = dict(  # Ho et al.'s CIFAR-10 run
    device=None, precision="auto", seed=0, batch_size=128, data_root="./data", num_workers=4, inception=None,
    compile=None, data="cifar10", image_size=None, out=None, steps=800_000, warmup=5000, lr=2e-4, grad_clip=1.0,
    ch=128, num_res_blocks=2, ch_mult=(1, 2, 2, 2), attn_res=(16,), dropout=0.1, ema_decay=0.9999, timesteps=1000,
    schedule="linear", p_uncond=0.1, eta=0.0, save_every=5000, log_every=100, keep_every=0, sample_every=10000,
    fid_every=0, fid_n=1000, fid_ref=None, micro_batch=None, grad_checkpoint=False, init=None, loss="l2",
    report_to=(), flip=None, unconditional=False, prediction="eps", snr_gamma=0.0,
    task="generate", factor=4,
    same_padding=True, norm_eps=1e-6, variance="fixedlarge")  # no flags: Ho et al.'s exact network, σ²_t = β_t
# What older runs lack, as they ran: among them the network's padding and GroupNorm ε before Ho et al.'s exact ones
LEGACY = dict(channels=3, same_padding=False, norm_eps=1e-5)  # (no flip, eta, variance: as the defaults)
PRESETS = {"paper": {}, "small": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(), dropout=0.0, lr=1e-3,
                                      batch_size=32, warmup=200, steps=1150, ema_decay=0.999, eta=1.0, log_every=50)}
# The network for larger images without --ch-mult: at 256 px Ho et al.'s LSUN and CelebA-HQ one (114M parameters;
# App. B, run_celebahq.py); at 64 and 128 px guided-diffusion's multipliers, attention at 16 and 8 px (improved DDPM).
NET_BY_SIZE = {64: dict(ch_mult=(1, 2, 3, 4), attn_res=(16, 8)), 128: dict(ch_mult=(1, 1, 2, 3, 4), attn_res=(16, 8)),
               256: dict(ch_mult=(1, 1, 2, 2, 4, 4), attn_res=(16,), lr=2e-5, batch_size=64, dropout=0.0)}
NATIVE_SIZE = {"cifar10": 32, "mnist": 28, "fashion-mnist": 28}  # torchvision's data sets, in pixels
INIT_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_res", "timesteps", "schedule", "unconditional", "same_padding",
             "norm_eps", "task", "factor")  # --init's network
# What a resumed run may change; everything else must match the checkpoint, or the run would silently differ.
RESUMABLE = {"steps", "save_every", "keep_every", "sample_every", "log_every", "device", "num_workers", "eta",
             "precision", "compile", "data", "data_root", "out", "fid_every", "fid_n", "fid_ref", "inception",
             "micro_batch", "report_to", "grad_checkpoint"}


def hw(size):  # an image size, S or (H, W) → (H, W)
    return (size, size) if isinstance(size, int) else tuple(size)


def run_config(saved=None, preset="paper", given=None, init=None):
    """A run's config, complete: saved (a checkpoint's), with the keys older releases lack as they ran and the flags
    added since off, or else a new run's (new_config); flip None (not given, or a run older than the setting): on,
    but off for MNIST, as a mirrored 7 is no 7; then the flags given, {key: value}: a resumed run may change only
    what is RESUMABLE, or it would silently differ (a new run holds them already)."""
    given = given or {}
    cfg = new_config(preset, given, init) if saved is None else {**DEFAULTS, **LEGACY, **saved}
    if cfg["flip"] is None:
        cfg["flip"] = cfg["data"] != "mnist"
    for key, value in given.items():
        if key not in RESUMABLE and value != cfg[key]:
            raise UserError(f"--{key.replace('_', '-')} {value}: the run in {given.get('out')} used {cfg[key]}; "
                            f"drop the flag to resume it, or train into another --out")
    return {**cfg, **given}


def new_config(preset, given, init):
    """A new run's config: the flags given, over the preset, over Ho et al.'s defaults; init (--init's config): its
    network and schedule, and its image size unless given; else a network sized for the images."""
    cfg = {**DEFAULTS, **PRESETS[preset], **given}
    if init is not None:  # fine-tuning: the network and schedule are --init's, and its image size unless given
        for key in INIT_KEYS:
            if key in given and given[key] != init[key]:
                raise UserError(f"--{key.replace('_', '-')} {given[key]}: the network comes from --init "
                                f"{cfg['init']}, which has {init[key]}")
        cfg.update({k: init[k] for k in INIT_KEYS}, image_size=cfg["image_size"] or init["image_size"],
                   prediction=given.get("prediction", init["prediction"]))  # what its weights predict, unless given
    native = NATIVE_SIZE.get(cfg["data"], 32)  # the data's own size if the U-Net can halve it enough, else 32
    cfg["image_size"] = cfg["image_size"] or (32 if native % 2 ** (len(cfg["ch_mult"]) - 1) else native)
    if preset == "paper" and init is None and "ch_mult" not in given:  # a network sized for the images
        cfg.update({k: v for k, v in NET_BY_SIZE.get(max(hw(cfg["image_size"])), {}).items() if k not in given})
    factor = 2 ** (len(cfg["ch_mult"]) - 1)  # now, not once the data is decoded
    sides = hw(cfg["image_size"])
    if cfg["task"] == "upscale" and any(side % cfg["factor"] for side in sides):
        raise UserError(f"--factor {cfg['factor']}: the image size {cfg['image_size']} is no multiple of it")
    if any(side % factor for side in sides):
        near = [" or ".join(map(str, sorted({max(factor, s - s % factor), s + -s % factor}))) for s in sides]
        raise UserError(f"--image-size {','.join(map(str, dict.fromkeys(sides)))}: a U-Net of {len(cfg['ch_mult'])} "
                        f"levels halves it {len(cfg['ch_mult']) - 1} times, so each side must be a multiple of "
                        f"{factor}; the nearest: {' by '.join(dict.fromkeys(near))}")
    return cfg


def read_checkpoint(path, mmap=False):
    """A checkpoint or export file → its dict, the config completed (run_config), or UserError."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    ckpt = load_weights(path, mmap)
    if not isinstance(ckpt, dict) or not {"config", "classes", "ema", "step"} <= ckpt.keys():
        raise UserError(f"{path}: not a ddpm.py checkpoint")
    ckpt["config"] = run_config(ckpt["config"])
    return ckpt


def cond_channels(cfg):  # what the U-Net sees beside x_t: nothing, the low-res image at full size, or the grey one
    return {"generate": 0, "upscale": cfg["channels"], "colorize": 1}[cfg["task"]]


def unet_from_config(cfg, num_classes):
    return UNet(cfg["channels"], cfg["ch"], cfg["ch_mult"], cfg["num_res_blocks"], cfg["attn_res"],
                cfg["dropout"], cfg["image_size"], None if cfg["unconditional"] else num_classes,
                cfg["same_padding"], cfg["norm_eps"], cond_channels(cfg))


def export_model(ckpt, out):
    """A checkpoint → a file to share, a quarter of its size: the EMA weights alone in fp16, config and class names."""
    ema = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["ema"]["model"].items()}
    save_atomic(out, lambda f: torch.save(dict(config=dict(ckpt["config"], steps=ckpt["step"]), classes=ckpt["classes"],
                                               step=ckpt["step"], ema=dict(model=ema)), f), durable=True)
