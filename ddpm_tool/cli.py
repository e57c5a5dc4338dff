"""
cli.py: the command line. Each command is its flags, a table of rows, directly above its handler, whose docstring's
first line is its --help; main builds the parser from COMMANDS and turns every UserError into one line on stderr and
an exit code. The handlers turn flags into the values the modules below take. The flags' types and shared rows are
flags.py's.
"""
import importlib
import json
import os
import shutil
import sys

import torch
import torch.distributed as dist

from ddpm import Diffusion, slerp

from . import convert, fid, nll, pictures
from .data import load_images, random_subset, to_uint8
from .devices import autocast, get_device, init_processes
from .flags import (CKPT, DATA_ROOT, INCEPTION, INPUT, JSON, OUT, RUN, SAMPLER, SEED, SOME, SUBSET, TRACKERS, TRAIN,
                    TRAIN_ONLY, WORKERS, Parser, add_options, check_config, image_sizes, number, numbers, picture_out)
from .runs import (DEFAULTS, NATIVE_SIZE, UserError, ensure_writable, export_model, hold, missing, run_config,
                   save_atomic)
from .sampling import (SAMPLERS, class_labels, describe, draw, edit_inputs, fid_reference, find_checkpoint, inception,
                       is_folder, load_checkpoint, load_mask, load_run, reverse_process, forward_process, sample_out,
                       sampler_options, write_samples)
from .restore import restore
from .trainer import Trainer

def cmd_train(args):
    """train a model (default: Ho et al.'s CIFAR-10 setup)"""
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    name = os.path.basename(os.path.normpath(given.get("data", "cifar10")))
    out = given.setdefault("out", os.path.join("runs", name))
    first = not int(os.environ.get("RANK", 0))  # rank 0 holds the run folder
    lock = hold(out) if first and os.path.isdir(out) else None  # before anything reads it
    try:
        cfg, ckpt = train_config(given, out, args.resume, args.preset or "paper")
        trainer = Trainer(cfg, ckpt, *init_processes(cfg["batch_size"], cfg["device"], cfg["micro_batch"]))
        if first and lock is None:  # a new run's folder, made only now: a run that cannot start leaves none
            lock = hold(out)
        return trainer.run()  # → 0, or 128 + the signal that stopped it
    finally:
        if lock:
            lock.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def train_config(given, out, resume, preset):
    """The run's config (runs.run_config) and checkpoint (None for a new run): new from the flags given, or resumed
    from out/ckpt.pt, whose flags may change only where RESUMABLE; the trackers asked for, found before any data."""
    path = os.path.join(out, "ckpt.pt")
    ckpt = None
    init = None
    if resume:
        if not os.path.exists(path):
            raise UserError(f"--resume: no checkpoint in {out}/ to resume (start without --resume)")
        ckpt = load_checkpoint(path)
        check_config(ckpt["config"], path)
        if "optimizer" not in ckpt:  # export_model's file: EMA weights alone
            raise UserError(f"{path} is an exported model (EMA weights only: no optimizer, no random states): it "
                            f"cannot resume a run; fine-tune from it with train --init {path} --out NEW_FOLDER")
    elif os.path.exists(path):
        raise UserError(f"{path} exists: pass --resume to continue that run, or choose another --out")
    elif given.get("init"):  # fine-tuning: --init's network (its weights are read once, by the Trainer)
        init = check_config(load_checkpoint(given["init"], mmap=True)["config"], given["init"])
    cfg = run_config(None if ckpt is None else ckpt["config"], preset, given, init)
    if cfg["fid_every"]:  # now, not at the first FID hours in
        importlib.import_module("torch_fidelity")
    for name in cfg["report_to"]:
        try:
            importlib.import_module(TRACKERS[name])
        except ImportError:
            raise UserError(f"--report-to {name} needs the {name} package: pip install {name}") from None
    return cfg, ckpt


def sampling_run(args, deterministic=False, resample=1):
    """--ckpt loaded (load_run) with the sampler, batch size and compilation the flags ask for: how every command that
    samples starts. deterministic: interpolate's; resample: inpaint's --resample."""
    run = load_run(args.ckpt, args.device, args.precision,
                   check=lambda cfg, path: check_config(cfg, path, args.command))
    options = sampler_options(run.device, run.cfg["eta"], run.diffusion.num_timesteps, args.sampler, args.steps,
                              args.spacing, args.eta, args.guidance, deterministic, resample)
    # CPU: batches of 16 keep tensors under glibc's 32 MB mmap threshold, so memory is reused, not faulted in anew
    batch_size = args.batch_size or (1024 if run.device.type == "cuda" else 16)  # (64 ships, 2 cores: 45 → 34 s)
    return run._replace(options=options, batch_size=batch_size, compile=args.compile)


SAMPLE = RUN + SAMPLER + [OUT, ("--n", number(int, 1, 10 ** 7), 64, "samples"),
                          ("--process", "switch", "write the reverse process instead: NAME.gif (x_t beside its "
                           "predicted x_0, 10 steps) and NAME.png (those steps, up to 8 samples) for --out NAME.png")]


def cmd_sample(args):
    """sample a PNG grid (or a PNG per image), or picture the reverse process

    --process: NAME.gif (x_t beside x̂_0 at 10 steps, looping, the last frame held) and NAME.png (the same 10 steps
    left to right, two rows for each of the first 8 samples: x_t above x̂_0)."""
    run = sampling_run(args)
    grid = args.process or not (args.out and is_folder(args.out))  # a grid has whole rows, a class each
    labels, nrow, name = class_labels(run, args.n, grid, getattr(args, "class"))
    n = args.n if labels is None else len(labels)
    if n != args.n:
        print(f"note: --n {args.n} makes a grid of {n}, {nrow} of each class, a row each (--out DIR/: exactly "
              f"{args.n}, the classes in turn)", file=sys.stderr)
    if not args.process:
        return write_samples(run, args.out, args.seed, f"{name}.png", draw(run, n, y=labels),
                             lambda x: pictures.grid(to_uint8(x), nrow), "samples")
    out, per_file = sample_out(args.out, f"{name}.png")
    base = os.path.join(out, name) if per_file else os.path.splitext(out)[0]
    y = None if labels is None else labels.to(run.device)
    torch.manual_seed(args.seed)
    with autocast(run.device, run.precision):
        _, frames = reverse_process(run.model, run.diffusion, n, y=y, **run.options)
    gif, strip = pictures.reverse_process([(t, to_uint8(x_t), to_uint8(x0)) for t, x_t, x0 in frames], nrow)
    save_atomic(base + ".gif", lambda f: pictures.save_gif(gif, f))
    save_atomic(base + ".png", strip.save)
    print(f"wrote the reverse process of {n} samples ({len(frames)} steps of {run.options['steps'] or 'all'}) to "
          f"{base}.gif and {base}.png", file=sys.stderr)
    return 0


INPAINT = [INPUT] + RUN + SAMPLER + [
    OUT, ("--n", SOME, 8, "results: a random N of FOLDER's images, or IMAGE N times, each with noise "
          "of its own"),
    ("--mask", str, "a PNG, white (≥ 128 of 255) where the model paints, of the model's or the image's size "
     "(default: the centre square of half the side)"),
    ("--resample", number(int, 1, 100), 1, "RePaint's resampling: each step redone R times (R × the cost; R > 1 "
     "samples with DDIM, 25 steps, η = 1 unless given)")]


def cmd_inpaint(args):
    """fill in images where a mask is white: rows of input, mask and result

    After every step the known pixels are drawn anew from q (Diffusion.paste_known); at the end, the input's."""
    run = sampling_run(args, resample=args.resample)
    images, labels, index = edit_inputs(args.input, run, args.n, args.seed, getattr(args, "class"), args.command)
    x_known = images[index]
    known = load_mask(args.mask, run.cfg["image_size"], args.input).expand(args.n, *run.shape)
    shown = (1 - known) * 2 - 1  # white where the model paints
    if known.all() or not known.any():
        what = "nothing: the results are the inputs" if known.all() else "everything: it is plain sampling"
        print(f"note: --mask {args.mask} paints {what}", file=sys.stderr)

    def strip(results):  # a row each: input, mask, result
        rows = to_uint8(torch.stack([x_known, shown, results], 1))
        return pictures.editing_strip(rows, ["input", "mask", "inpainted"])
    batches = draw(run, args.n, y=labels, known=(x_known, known, args.resample))
    return write_samples(run, args.out, args.seed, "inpaint.png", batches, strip, "results of inpaint")


INTERPOLATE = RUN + SAMPLER + [OUT, ("--frames", number(int, 2, 1000), 8, "samples a row")]


def cmd_interpolate(args):
    """samples from the slerp of two seeded noises, sampled deterministically: a row for --class, else one per class

    The frames of a row are the samples of slerp(z1, z2, λ) for λ from 0 to 1, z1 and z2 drawn with --seed."""
    run = sampling_run(args, deterministic=True)
    labels = class_labels(run, 1, True, getattr(args, "class"))[0]  # --class's row, or one per class (None: none)
    rows = 1 if labels is None else len(labels)
    g = torch.Generator().manual_seed(args.seed)
    z1 = torch.randn(run.shape, generator=g)
    z2 = torch.randn(run.shape, generator=g)
    lams = [j / (args.frames - 1) for j in range(args.frames)]
    noise = torch.stack([slerp(z1, z2, lam) for lam in lams]).repeat(rows, 1, 1, 1)
    y = None if labels is None else labels.repeat_interleave(args.frames)
    names = [] if labels is None else [run.classes[c][:7] for c in labels.tolist()]

    def strip(results):  # the font has no λ
        return pictures.editing_strip(to_uint8(results).split(args.frames), [f"{lam:.2f}" for lam in lams], names)
    return write_samples(run, args.out, args.seed, "interpolate.png", draw(run, len(noise), y=y, noise=noise), strip,
                         "results of interpolate")


IMG2IMG = [INPUT] + RUN + SAMPLER + [
    OUT, ("--n", SOME, 4, "results for each strength: a random N of FOLDER's images, or IMAGE N "
          "times, each with noise of its own"),
    ("--strength", numbers(float, 0, 1), (0.5,), "0 returns the input, 1 is plain sampling; several, comma-separated, "
     "give a row each")]


def cmd_img2img(args):
    """image-to-image (SDEdit): noise images to t = strength · (T − 1), then sample from there

    For each input and strength a row: the input, then its results."""
    run = sampling_run(args)
    images, labels, index = edit_inputs(args.input, run, args.n, args.seed, getattr(args, "class"), args.command)

    def strip(results):
        results = to_uint8(results).view(len(args.strength), args.n, *run.shape)
        inputs = to_uint8(images)
        rows = [[image, *results[s][index == i]] for i, image in enumerate(inputs) for s in range(len(results))]
        columns = ["input"] + [f"seed {k + 1}" for k in range(len(rows[0]) - 1)]
        names = [f"s={s:g}" for s in args.strength] * len(images)
        return pictures.editing_strip(rows, columns, names)
    batches = (b for s in args.strength for b in draw(run, args.n, y=labels, image=images[index], strength=s))
    return write_samples(run, args.out, args.seed, "img2img.png", batches, strip, "results of img2img")


RESTORE = [INPUT] + RUN + SAMPLER + [
    OUT, ("--n", SOME, 8, "results: a random N of FOLDER's images, or IMAGE N times, each with noise of its own")]


def cmd_upscale(args):
    """super-resolution (SR3) with a model of `train --task upscale`: rows of input, bicubic, result (and truth)

    An input of the model's low resolution is upscaled; one of its own size is area-downsampled first, as in training,
    so that the truth is known: the PSNR of the result and of bicubic against it, and the consistency (the result
    downsampled again, against the input), are printed."""
    run = sampling_run(args)
    return restore(run, args.input, args.n, args.seed, getattr(args, "class"), "upscale", args.out)


def cmd_colorize(args):
    """colourisation (Palette) with a model of `train --task colorize`: rows of grey input, result (and truth)

    A grey input is coloured; a colour one of the model's size is made grey first, as in training, so that the truth
    is known: the PSNR of the result and of the grey image against it are printed."""
    run = sampling_run(args)
    return restore(run, args.input, args.n, args.seed, getattr(args, "class"), "colorize", args.out)


FID = RUN + SAMPLER + [INCEPTION, DATA_ROOT, WORKERS, JSON,
        ("--ref", str, "cifar10 or mnist (their training sets), an image folder, or an .npz of mu and sigma "
         "(pytorch-fid's format) (default: the checkpoint's training data)"),
        ("--n", SUBSET, "samples (default: 50,000 on CUDA, as the papers; 1,000 on a CPU: small n "
         "biases FID upwards, compare only equal n)"),
        ("--samples", str, "score this image folder instead of a checkpoint (all its images, or a random --n)"),
        ("--image-size", image_sizes, "with --samples: decode at this size (default: the folder's own)"),
        ("--ref-n", SUBSET, "a fixed random subset of the reference images (default: all)")]


def cmd_fid(args):
    """FID of a checkpoint's samples, drawn as `sample` draws them, or of --samples DIR, against --ref"""
    device = get_device(args.device)
    net = inception(args.inception, device)
    precision = "fp32"  # Inception itself always runs in fp32 (inception_stats)
    if args.samples:
        pick = random_subset(args.n, args.seed)
        images = load_images(args.samples, image_size=args.image_size, pick=pick, flag="--samples")[0]
        batches = [images]  # Inception sees them 50 at a time (fid.inception_stats)
        shape = images.shape[1:]
        source = args.samples
        data = None
        result = dict(samples=source)
    else:
        run = sampling_run(args)
        n = args.n or (50_000 if device.type == "cuda" else 1000)  # the papers' 50,000; a CPU: seconds a sample
        batches = map(to_uint8, draw(run, n, y=class_labels(run, n, False, getattr(args, "class"))[0]))
        shape = run.shape
        precision = run.precision
        source = f"{run.path} ({describe(run)}, guidance {args.guidance}, seed {args.seed}, {run.precision})"
        data = run.cfg["data"]
        result = dict(ckpt=run.path, sampler=describe(run), guidance=args.guidance, seed=args.seed,
                      precision=run.precision)
    ref = args.ref or data
    if ref is None:
        raise UserError("--ref: which images to compare with? (cifar10, mnist, a folder or an .npz)")
    # The reference first: its statistics are cached, and a bad --ref is refused before any sampling
    stats = fid_reference(net, ref, args.data_root, tuple(shape[1:]), args.ref_n, args.num_workers, shape[0])
    torch.manual_seed(args.seed)
    with autocast(device, precision):
        mu, sigma, n = fid.inception_stats(net, batches)
    score = fid.frechet_distance(mu, sigma, *stats[:2])
    result = dict(fid=round(score, 4), n=n, **result, ref=ref, ref_n=stats[2])
    print(json.dumps(result) if args.json else f"FID {score:.3f} of {n} images from {source} against {ref} (n "
          f"{stats[2]})")
    return 0


NLL_CPU_T_SAMPLES = 100  # `nll --t-samples` on a CPU (GPU: all T terms); measured: docs/measurements.md


NLL = RUN + [CKPT, DATA_ROOT, WORKERS, JSON,
        ("--data", str, None, "cifar10, mnist, fashion-mnist or a folder, scored whole (default: the model's data)"),
        ("--split", ("train", "test"), "the split of cifar10, mnist or fashion-mnist (default: test)"),
        ("--n", SUBSET, "a fixed random subset of the images, as fid --n (default: all)"),
        ("--t-samples", SOME, "estimate the sum of the KL terms from K of them an image: "
         "t = 1 … K/2 exactly, K/2 of the rest drawn uniformly and scaled; unbiased, and the prior and decoder stay "
         f"exact (default: all T − 1 on a GPU, {NLL_CPU_T_SAMPLES} on a CPU)"),
        ("--variance", ("fixedlarge", "fixedsmall"), None, "σ²_t of p_θ: β_t (Ho et al.'s CIFAR-10) or the posterior's "
         "β̃_t (default: the model's)")]


def cmd_nll(args):
    """the variational bound in bits/dim (Ho et al.'s Table 2) of a checkpoint on a data set's test images

    Of the EMA model; a class-conditional one through its null label: p(x), as the paper's."""
    run = load_run(args.ckpt, args.device, args.precision, "nll", lambda cfg, path: check_config(cfg, path, "nll"))
    variance = args.variance or run.cfg["variance"]
    diffusion = Diffusion(run.cfg["timesteps"], run.cfg["schedule"], variance, run.device, run.cfg["prediction"])
    T = diffusion.num_timesteps
    if args.t_samples is not None and args.t_samples > T - 1:
        raise UserError(f"--t-samples {args.t_samples}: the model has T − 1 = {T - 1} terms with t ≥ 1 to draw from")
    data = args.data or run.cfg["data"]
    if data is None:
        raise UserError(f"--data: {run.path} does not say what it was trained on; pass cifar10, mnist or a folder")
    folder = data not in NATIVE_SIZE
    if folder and args.split:
        raise UserError(f"--split {args.split}: --data {data} is a folder, scored whole; --split is for "
                        f"{', '.join(NATIVE_SIZE)}")
    pick = random_subset(args.n, args.seed)
    images = load_images(data, args.data_root, run.cfg["image_size"], args.num_workers, pick,
                         train=args.split == "train")[0]
    if len(images) < 2:  # as --n 1
        raise UserError(f"--data {data}: one image; the bound's standard error needs at least 2")
    if images.shape[1:] != run.shape:
        raise UserError(f"--data {data}: its images are {'×'.join(map(str, images.shape[1:]))} (channels × pixels), "
                        f"the model's are {'×'.join(map(str, run.shape))}")
    t_samples = args.t_samples
    if t_samples is None and run.device.type == "cpu":  # measured: docs/measurements.md
        t_samples = min(NLL_CPU_T_SAMPLES, T - 1)
    if t_samples == T - 1:
        t_samples = None  # every term: exact
    batch_size = args.batch_size or (1024 if run.device.type == "cuda" else 64)
    with autocast(run.device, run.precision):
        prior, decoder, kl = nll.bits_per_dim(run.model, diffusion, images, batch_size, t_samples, args.seed)
    total = prior + decoder + kl
    how = "all terms" if t_samples is None else f"{t_samples} of the {T - 1} KL terms an image, estimated"
    split = "" if folder else f" ({args.split or 'test'} split)"
    result = dict(bpd=round(total.mean().item(), 4), se=round(total.std().item() / len(total) ** 0.5, 4),
                  prior=round(prior.mean().item(), 6), decoder=round(decoder.mean().item(), 4),
                  kl=round(kl.mean().item(), 4), n=len(total), terms=how, exact=t_samples is None, ckpt=run.path,
                  data=data + split, precision=run.precision, variance=variance, seed=args.seed)
    print(json.dumps(result) if args.json else f"NLL ≤ {result['bpd']:.3f} ± {result['se']:.3f} bits/dim of "
          f"{len(total)} images of {data}{split} (prior {result['prior']:.5f}, decoder {result['decoder']:.3f}, KL "
          f"terms {result['kl']:.3f}; {how}) from {run.path}, {run.precision}, {variance}")
    return 0


EXPORT = [CKPT,
        ("--out", str, ..., "the file (fp16) or folder (diffusers) to write; it must not exist"),
        ("--format", ("fp16", "diffusers"), "fp16", "fp16: EMA weights, config and classes, a quarter of ckpt.pt; "
         "diffusers: a DDPMPipeline folder, a class-conditional model as the unconditional one guidance uses"),
        ("--keep-classes", "switch", "with --format diffusers: keep the class embedding (num_class_embeds = "
         "classes + 1, the last the null label)")]


def cmd_export(args):
    """a checkpoint's EMA model, to share (fp16) or for diffusers' DDPMPipeline"""
    out = args.out.rstrip("/" + os.sep) or args.out
    if os.path.exists(out):
        raise UserError(f"--out {out} exists: choose a new path")
    if args.keep_classes and args.format == "fp16":
        raise UserError("--keep-classes is for --format diffusers: an fp16 export keeps the classes anyway")
    ensure_writable(os.path.dirname(os.path.abspath(out)), "--out")
    path = find_checkpoint(args.ckpt)
    ckpt = load_checkpoint(path)
    check_config(ckpt["config"], path)
    task = ckpt["config"]["task"]
    if task != "generate" and args.format == "diffusers":  # its U-Net takes c: DDPMPipeline would not give it one
        raise UserError(f"{path}: a model of --task {task} takes an image, which diffusers' DDPMPipeline cannot give "
                        "it: export it with --format fp16")
    if args.format == "fp16":
        export_model(ckpt, out)
    else:
        tmp = f"{out}.tmp{os.getpid()}"
        try:
            convert.save_diffusers(ckpt, tmp, args.keep_classes)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote the EMA model of {path} to {out} ({args.format})", file=sys.stderr)
    return 0


FORWARD = [SEED, DATA_ROOT,
        ("--data", str, "cifar10", "cifar10, mnist, fashion-mnist or an image folder"),
        ("--image-size", number(int, 4, 4096), "side in pixels (default: the data's own; folders: 32)"),
        ("--n", number(int, 1, 100), 3, "training images, two rows each: linear and cosine schedule"),
        ("--out", picture_out, "a PNG, or a folder/ (default: outputs/forward_<data>.png)")]


def cmd_forward(args):
    """picture the forward process q(x_t | x_0): training images at 10 t turning into noise, and the schedules"""
    schedules = {s: Diffusion(1000, s) for s in ("linear", "cosine")}
    steps, spacing = SAMPLERS["dpm++"]  # the chart first: without matplotlib, nothing is decoded or written
    fig = pictures.schedule_chart({s: d.alphas_cumprod for s, d in schedules.items()},
                                  {s: d.sampling_steps(steps, spacing) for s, d in schedules.items()},
                                  f"{steps} {spacing} steps (DPM-Solver++)", schedules["linear"].sampling_steps(25),
                                  "25 uniform steps (DDIM)")
    size = args.image_size or NATIVE_SIZE.get(args.data, 32)
    g = torch.Generator().manual_seed(args.seed)
    x0 = load_images(args.data, args.data_root, size, pick=random_subset(args.n, g))[0]
    x0 = x0.float() / 127.5 - 1  # decoded: just the n chosen images, not the whole folder
    rows, ts = forward_process(x0, torch.randn(x0.shape, generator=g), list(schedules.values()))
    name = f"forward_{os.path.basename(os.path.normpath(args.data))}.png"
    out, per_file = sample_out(args.out, name)
    if per_file:
        out = os.path.join(out, name)
    save_atomic(out, pictures.forward_strip(to_uint8(rows), ts).save)
    chart = os.path.splitext(out)[0] + "_schedule.png"  # and the numbers behind it, at the CPU sampler's steps
    save_atomic(chart, lambda f: fig.savefig(f, format="png"))
    print(f"wrote q(x_t | x_0) of {len(x0)} images of {args.data} at t = {ts} to {out}, its schedules to {chart}",
          file=sys.stderr)
    return 0


# Each command: its handler, whose docstring's first line is its --help, and its flags, which stand above the handler
COMMANDS = {"train": (cmd_train, TRAIN + TRAIN_ONLY), "sample": (cmd_sample, SAMPLE),
            "inpaint": (cmd_inpaint, INPAINT), "interpolate": (cmd_interpolate, INTERPOLATE),
            "img2img": (cmd_img2img, IMG2IMG), "upscale": (cmd_upscale, RESTORE), "colorize": (cmd_colorize, RESTORE),
            "fid": (cmd_fid, FID), "nll": (cmd_nll, NLL), "export": (cmd_export, EXPORT),
            "forward": (cmd_forward, FORWARD)}


def main(argv=None):
    parser = Parser(prog="ddpm.py", description="DDPM (Ho et al. 2020): train on images, sample with guidance.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (handler, rows) in COMMANDS.items():
        help_line = handler.__doc__.splitlines()[0]  # no abbreviations: interpolate --n is not --no-compile
        command = sub.add_parser(name, help=help_line, description=help_line, allow_abbrev=False)
        add_options(command, rows, given_only=name == "train")
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][0](args)
    except (UserError, fid.FIDError) as e:  # convert's ConvertError is a UserError; fid's FIDError stands alone
        message = str(e)
        code = getattr(e, "code", 2)
    except ImportError as e:  # an optional package that this command needs
        message = missing(e, args.command)
        code = 2
    except torch.OutOfMemoryError:
        message = "out of GPU memory; try a smaller --batch-size"
        code = 2
    except OSError as e:  # a full disk or a folder gone while writing: save_atomic has left no partial file
        message = f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}"
        code = 1
    except KeyboardInterrupt:
        message = "interrupted"
        code = 130
    if not int(os.environ.get("RANK", 0)):  # under torchrun, one line from rank 0 rather than one per process
        print(f"ddpm.py: error: {message}", file=sys.stderr)
    return code
