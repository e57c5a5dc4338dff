"""
trainer.py: the Trainer, one training run. It feeds ddpm.train_step (Algorithm 1's step) its batches, in one process
or as one of several under torchrun (DDP), and keeps the books around it: the finite check and log.txt, atomic
checkpoints from which a resumed run continues bit for bit, the EMA previews, FID, the trackers, and signals.
"""
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from ddpm import EMA, Diffusion, ResBlock, train_step

from . import fid, pictures, trackers
from .data import batch_indices, class_rows, degrade, load_images, to_uint8
from .devices import autocast, resolve_precision
from .runs import UserError, cache_dir, hw, missing, save_atomic, unet_from_config
from .sampling import fid_reference, inception, load_checkpoint, sample_batches


class Trainer:
    """One run: __init__ builds its state (data, U-Net, EMA, Adam, the two random streams), new or resumed; train_step
    is Algorithm 1 once; periodic the bookkeeping after it; on_signal and agreed_signal stop it; run is the loop."""
    def __init__(self, cfg, ckpt, device, rank=0, world=1, ctrl=None):
        self.device = device
        self.rank = rank
        self.world = world
        self.ctrl = ctrl
        self.ddp = ctrl is not None
        torch.manual_seed(cfg["seed"])  # the weights' initialisation
        images, labels, self.classes = self.load_data(cfg, ckpt)
        cfg = dict(cfg, channels=images.shape[1])  # the data decides: 1 (grey) or 3, saved with the config
        if cfg["task"] == "colorize" and cfg["channels"] != 3:
            raise UserError(f"--task colorize: the images of --data {cfg['data']} are grey; it learns from colour ones")
        self.cfg = cfg
        self.fmt = torch.contiguous_format if device.type == "mps" else torch.channels_last  # NHWC: see build_model
        self.model = self.build_model(ckpt)
        self.ema = EMA(self.model, cfg["ema_decay"])
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"], fused=device.type == "cuda")
        self.diffusion = Diffusion(cfg["timesteps"], cfg["schedule"], device=device, prediction=cfg["prediction"])
        # Two random streams: `data` draws t, ε, flips and label drops for the whole global batch (the same in every
        # process), the global one dropout (its own in each process). Both are saved, so a resumed run is exact.
        self.data = torch.Generator(device).manual_seed(cfg["seed"])
        self.step = 0  # resume() sets the checkpoint's
        torch.manual_seed(cfg["seed"] * 1_000_003 + 7919 * (rank + 1))
        if ckpt is not None:
            self.resume(ckpt)
        self.out = cfg["out"]
        B = cfg["batch_size"]
        self.part = slice(rank * B // world, (rank + 1) * B // world)  # this process's share of every batch
        self.images = self.place(images)
        self.labels = labels.to(device)
        self.compiled = device.type == "cuda" if cfg["compile"] is None else cfg["compile"]
        self.forward = self.wrap(self.model)
        self.amp = autocast(device, resolve_precision(cfg["precision"], device, "train"))
        self.pending = []  # (loss, grad norm) per step: on the device until check(), then as floats in stats
        self.stats = []
        self.postfix = {}
        self.signals = []
        self.charts = True  # progress.png at each log line, until matplotlib is found missing
        self.saved = None if ckpt is None else ckpt["step"]  # the step of the last save
        self.log = os.path.join(self.out, "log.txt") if not rank else os.devnull  # report() appends to it
        self.t_log = time.time()  # images/s: since this time and step (restart_clock)
        self.step_log = self.step
        self.inception, self.fid_ref = self.setup_fid()  # before the first step (None, None: no --fid-every)
        self.trackers = None  # --report-to's, which run() opens and closes, as it does the progress bar
        self.bar = None

    def say(self, line):  # on stderr, in rank 0 only
        if not self.rank:
            print(line, file=sys.stderr)

    def build_model(self, ckpt):
        """The U-Net on the device, NHWC (tensor cores' layout, oneDNN's on a CPU); --init's weights for a new run."""
        cfg = self.cfg
        try:
            model = unet_from_config(cfg, len(self.classes)).to(self.device, memory_format=self.fmt)
        except ValueError as e:
            raise UserError(str(e)) from None
        if ckpt is None and cfg["init"]:
            self.init_from(cfg["init"], model)
        for block in model.modules():
            if isinstance(block, ResBlock):
                block.checkpoint = cfg["grad_checkpoint"]
        return model

    def load_data(self, cfg, ckpt):
        if self.rank:
            dist.barrier()  # until rank 0 has downloaded the data set, if it must
        try:
            images, labels, classes = load_images(cfg["data"], cfg["data_root"], cfg["image_size"], cfg["num_workers"],
                                                  cache=True)
        except UserError as e:  # a resumed run whose data went away: say how to go on
            raise UserError(f"{e}; {cfg['out']}/ckpt.pt of step {ckpt['step']} is whole: pass --data with --resume "
                            "to continue it on the data where it is now" if ckpt else e) from None
        if self.ddp and not self.rank:
            dist.barrier()
        if ckpt is not None and ckpt["classes"] != classes:  # a class list is fixed in the checkpoint: never changed
            differ = sorted(set(classes) ^ set(ckpt["classes"]))
            raise UserError(f"--data {cfg['data']} has classes {classes}, the run being resumed had {ckpt['classes']} "
                            f"(they differ in {differ})")
        return images, labels, classes

    def place(self, images):
        """The images on the GPU if they fit comfortably (CIFAR-10: 150 MB, so a batch is a gather), else in pinned
        memory if they fit there, else mapped from the decode cache; on a CPU they stay where load_images put them."""
        if self.device.type != "cuda" or images.numel() < torch.cuda.mem_get_info(self.device)[0] // 4:
            return images.to(self.device)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        return images if images.numel() > ram // 2 else images.pin_memory()

    def wrap(self, model):
        """The forward the steps call: compiled (on CUDA by default), under DDP in a process group."""
        cuda = self.device.type == "cuda"
        # CUDA graphs (under DDP too): forward and backward replay as one launch each, not ~1,000 kernels a step.
        # NHWC forced: inductor keeps NCHW if a conv takes 2x the channels it gives (up path), costing ~100 copies.
        options = {"triton.cudagraphs": cuda, "force_layout_optimization": True}  # = mode "reduce-overhead" + NHWC
        forward = model
        if self.compiled:
            forward = torch.compile(model, options=options)
            # Each forward starts a new step for CUDA graphs, which may overwrite the last step's outputs: marked by
            # a hook, as the outputs of the last micro-batch are kept (uncompiled: no 2 s import of the compiler)
            forward.register_forward_pre_hook(lambda module, args: torch.compiler.cudagraph_mark_step_begin())
        if self.ddp:
            devices = [self.device.index] if cuda else None
            forward = torch.nn.parallel.DistributedDataParallel(forward, device_ids=devices)
            forward.num_classes = model.num_classes
        return forward

    def init_from(self, path, model):
        """Fine-tuning: from the EMA weights of `path` (a checkpoint or an export); if its classes are not the data's,
        the class rows start anew but for the null label's, the unconditional model that guidance needs."""
        init = load_checkpoint(path)
        emb = model.class_emb
        weights = dict(init["ema"]["model"])
        if emb is not None and init["classes"] != self.classes and "class_emb.weight" in weights:
            null_row = weights["class_emb.weight"][-1:].float()
            weights["class_emb.weight"] = torch.cat([emb.weight.detach()[:-1].cpu(), null_row])
            self.say(f"--init {path}: its classes ({', '.join(init['classes'][:4])}, ...) are not the data's: the "
                     "class embedding starts anew, but for the null label's row")
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:  # another number of channels, or attention at other levels at this --image-size
            size = "×".join(map(str, hw(self.cfg["image_size"])))
            raise UserError(f"--init {path}: its weights do not fit a network for {self.cfg['channels']}-channel "
                            f"{size} images ({str(e).splitlines()[-1].strip()})") from None

    def resume(self, ckpt):
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.step = ckpt["step"]
        rng = ckpt["rng"]
        ranks = rng.get("ranks", [rng])  # checkpoints of the one-process releases hold only {"cpu", "cuda"}
        if "data" in rng:
            self.data.set_state(rng["data"])
        if len(ranks) == self.world:  # with another number of processes dropout continues from fresh seeds
            torch.set_rng_state(ranks[self.rank]["cpu"])
            if self.device.type == "cuda" and ranks[self.rank]["cuda"] is not None:
                torch.cuda.set_rng_state(ranks[self.rank]["cuda"], self.device)

    def train_step(self):
        """This step's batch x_0 ~ q(x_0), randomly flipped, through Algorithm 1's step → the lr used."""
        cfg = self.cfg
        B = cfg["batch_size"]
        idx = batch_indices(len(self.images), B, cfg["seed"], self.step)
        x0 = self.images[idx.to(self.images.device)].to(self.device, non_blocking=True)
        x0 = x0.float() / 127.5 - 1                                                 # pixels x/127.5 − 1 ∈ [-1, 1]
        idx = idx.to(self.device, non_blocking=True)
        flip = torch.rand(B, generator=self.data, device=self.device) < 0.5 * cfg["flip"]  # horizontal flips
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0).contiguous(memory_format=self.fmt)
        y = None if cfg["unconditional"] else self.labels[idx]
        cond = None if cfg["task"] == "generate" else degrade(x0, cfg["task"], cfg["factor"])  # c of the pair (x0, c)
        lr, loss, grad_norm = train_step(self.model, self.ema, self.opt, self.diffusion, x0, y, self.step, cfg,
                                         self.data, self.part, self.forward, self.amp, cond)
        self.pending.append(torch.stack([loss, grad_norm]))
        self.step += 1
        return lr

    def periodic(self, lr):
        """The bookkeeping after a step: the finite check and the log line, checkpoints, the EMA preview, FID."""
        cfg, step = self.cfg, self.step
        self.bar.update(1)
        log_now = step % cfg["log_every"] == 0 or step == cfg["steps"]
        if log_now or len(self.pending) == 1000:
            self.check()
        if log_now:
            self.log_line(lr)
        if step % cfg["save_every"] == 0 or step == cfg["steps"] or self.keep():
            self.save()
        if cfg["sample_every"] and step % cfg["sample_every"] == 0 and not self.rank:
            self.preview()
        if cfg["fid_every"] and step % cfg["fid_every"] == 0 and not self.rank:
            self.measure_fid()

    def check(self):
        """Waits for the device: at log lines and before saves, as a sync per step would idle the GPU."""
        values = torch.stack(self.pending) if self.pending else torch.zeros(0, 2, device=self.device)
        if self.ddp:  # the mean loss over all processes (the gradient norm is the same in each)
            dist.all_reduce(values.div_(self.world))
        values = values.tolist()
        self.pending.clear()
        for at, (loss_value, grad_value) in enumerate(values, start=self.step - len(values) + 1):
            if not math.isfinite(loss_value + grad_value):  # the weights in memory are spoilt now; none reach disk
                raise UserError(f"non-finite loss ({loss_value}) or gradient norm ({grad_value}) at step {at}; stopped "
                                f"without saving; the last checkpoint in {self.out} is kept (try a lower --lr)", code=1)
        self.stats.extend(values)

    def log_line(self, lr):
        stats, B = self.stats, self.cfg["batch_size"]
        rate = (self.step - self.step_log) * B / (time.time() - self.t_log)
        loss_value = sum(v[0] for v in stats) / len(stats)
        self.postfix.update(loss=f"{loss_value:.4f}", img_s=f"{rate:.0f}")
        self.bar.set_postfix(self.postfix)
        self.report(f"loss {loss_value:.5f} lr {lr:.3e} grad_norm {stats[-1][1]:.3f} img/s {rate:.1f}",
                    loss=loss_value, lr=lr, grad_norm=stats[-1][1], img_s=rate)
        stats.clear()
        if not self.rank:
            self.draw_progress()
        self.restart_clock()

    def restart_clock(self):  # images/s counts training steps only: from now on
        self.t_log = time.time()
        self.step_log = self.step

    def draw_progress(self):
        """progress.png: the loss (and FID) against the step, from log.txt; without matplotlib, a note, and on."""
        if not self.charts:
            return
        try:
            fig = pictures.progress_chart(self.log)
        except ImportError as e:
            self.charts = False
            print(f"note: no progress.png: {missing(e, 'progress.png')}", file=sys.stderr)
            return
        save_atomic(os.path.join(self.out, "progress.png"), lambda f: fig.savefig(f, format="png"))

    def report(self, line, **values):
        """A line into log.txt (after the step), and the values (numbers, PIL images) to --report-to's trackers."""
        if line:
            with open(self.log, "a") as log:
                print(f"step {self.step} {line}", file=log)
        if self.trackers:
            self.trackers.log(self.step, **values)

    def keep(self):  # also a ckpt_<step>.pt at this step?
        return bool(self.cfg["keep_every"] and self.step % self.cfg["keep_every"] == 0)

    def save(self):
        """Called in every process: they all take part in check() and in gathering the RNG states; rank 0 writes."""
        self.check()
        cuda = self.device.type == "cuda"
        ranks = [{"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if cuda else None}]
        ranks *= self.world
        if self.ddp:
            dist.all_gather_object(ranks, ranks[0], group=self.ctrl)
        state = dict(model=self.model.state_dict(), ema=self.ema.state_dict(), optimizer=self.opt.state_dict(),
                     step=self.step, config=dict(self.cfg), classes=self.classes,
                     rng=dict(data=self.data.get_state(), ranks=ranks))
        paths = [os.path.join(self.out, "ckpt.pt")]
        if self.keep():
            paths.append(os.path.join(self.out, f"ckpt_{self.step:08d}.pt"))
        if not self.rank:
            for path in paths:
                save_atomic(path, lambda f: torch.save(state, f), durable=True)
        self.saved = self.step

    def ema_samples(self, n, batch_size):
        """n EMA samples in batches (sample_batches), as `sample` draws them (DDIM, guidance 2, the classes in turn),
        from a generator of their own: the EMA model is in eval mode, so the training RNG is untouched."""
        cfg = self.cfg
        y = None if cfg["unconditional"] else class_rows(len(self.classes), n)[0][:n]
        cond = None
        if cfg["task"] != "generate":  # a conditioned model: c of the first n training images, and their classes
            idx = torch.arange(n) % len(self.images)
            y = None if cfg["unconditional"] else self.labels[idx.to(self.labels.device)]
            x0 = self.images[idx.to(self.images.device)].to(self.device).float() / 127.5 - 1
            cond = degrade(x0, cfg["task"], cfg["factor"])
        g = torch.Generator(self.device).manual_seed(cfg["seed"])
        return sample_batches(self.ema.model, self.diffusion, n, batch_size, y=y, guidance=2.0,
                              steps=min(100, cfg["timesteps"]), eta=cfg["eta"], generator=g, cond=cond)

    def preview(self):  # a grid of EMA samples in the run folder, a row per class
        labels, nrow = (None, 8) if self.cfg["unconditional"] else class_rows(len(self.classes), 64)
        n = 64 if labels is None else len(labels)
        with self.amp:
            image = pictures.grid(to_uint8(torch.cat(list(self.ema_samples(n, n)))), nrow)
        save_atomic(os.path.join(self.out, f"samples_{self.step:08d}.png"), image.save)
        self.report(None, samples=image)
        self.restart_clock()

    def setup_fid(self):
        """--fid-every's Inception and the statistics of the training images or of --fid-ref (cached) → (the network,
        (μ, Σ, n)); (None, None) without --fid-every, and in every process but rank 0."""
        cfg = self.cfg
        if not cfg["fid_every"] or self.rank:
            return None, None
        net = inception(cfg["inception"], self.device)
        if cfg["fid_ref"] is None:
            return net, fid.cached_stats(net, self.images, cache_dir("fid"))
        return net, fid_reference(net, cfg["fid_ref"], cfg["data_root"], cfg["image_size"], None, cfg["num_workers"],
                                  cfg["channels"])

    def measure_fid(self):
        """FID of fid_n EMA samples against the reference, into log.txt and the progress bar."""
        cfg = self.cfg
        n = cfg["fid_n"]
        with self.amp:  # Inception itself runs in fp32 (inception_stats)
            stats = fid.inception_stats(self.inception, map(to_uint8, self.ema_samples(n, cfg["batch_size"])))
        score = fid.frechet_distance(*stats[:2], *self.fid_ref[:2])
        self.postfix["fid"] = f"{score:.2f}"
        self.bar.set_postfix(self.postfix)
        self.report(f"fid {score:.4f} n {n} DDIM {min(100, cfg['timesteps'])} steps, eta {cfg['eta']}, guidance 2.0",
                    fid=score)
        self.restart_clock()

    def on_signal(self, sig, frame):  # the first signal: save and stop after this step; a second: stop now
        self.signals.append(sig)
        if len(self.signals) > 1:
            raise KeyboardInterrupt  # checkpoints are atomic, so the last one stays whole

    def agreed_signal(self):
        """The signal to stop for (0: none), the same in every process whichever got it: all stop after one step."""
        signum = torch.tensor(self.signals[:1] or [0])
        if self.ddp:
            dist.all_reduce(signum, dist.ReduceOp.MAX, group=self.ctrl)
        return int(signum)

    def announce(self):  # what is trained, on what, where
        cfg = self.cfg
        params = sum(p.numel() for p in self.model.parameters())
        if params > 20e6 and self.device.type == "cpu":
            self.say(f"note: this {params / 1e6:.1f}M-parameter U-Net is sized for a GPU (2 CPU cores train it at "
                     "~3.3 images/s); --preset small learns digits (--data mnist) on a CPU in 3-10 minutes")
        processes = f"{self.world} processes" if self.world > 1 else "1 process"
        images = f"{len(self.images)} image{'s' if len(self.images) > 1 else ''}"
        classes = f"{len(self.classes)} class{'es' if len(self.classes) > 1 else ''}"
        self.say(f"training {params / 1e6:.2f}M-parameter U-Net on {images} ({classes}) on {self.device} in "
                 f"{processes}, step {self.step} → {cfg['steps']}, run folder {self.out}")

    def run(self):
        """Train to cfg["steps"] → 0, or after a signal save and → 128 + its number."""
        cfg = self.cfg
        out = self.out
        signum = 0
        self.announce()
        if cfg["report_to"] and not self.rank:  # rank 0 alone reports
            self.trackers = trackers.Trackers(cfg, self.step)
        self.bar = tqdm(total=cfg["steps"], initial=self.step, dynamic_ncols=True, disable=True if self.rank else None)
        handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            open(self.log, "a").close()  # log.txt from the start, lines or not
            self.restart_clock()
            while self.step < cfg["steps"] and not signum:
                self.periodic(self.train_step())
                signum = self.agreed_signal()
            if signum:
                self.save()
        except OSError as e:  # a full disk, a folder gone or unwritable: saves are atomic, the last one is whole
            kept = self.saved is not None and os.path.isfile(os.path.join(out, "ckpt.pt"))
            how = f"no checkpoint is left in {out}"
            if kept:
                how = (f"{out}/ckpt.pt of step {self.saved} is whole; fix that, then resume with: python ddpm.py "
                       f"train --resume --out {out}")
            raise UserError(f"cannot write in {out} at step {self.step} ({e.strerror}); {how}", code=1) from None
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            self.bar.close()
            if self.trackers:
                self.trackers.close()
        if signum:
            self.say(f"interrupted at step {self.step}; saved {out}/ckpt.pt. Resume with: "
                     f"{'torchrun … ' if self.ddp else 'python '}ddpm.py train --resume --out {out}")
            return 128 + signum
        self.say(f"done: {out}/ckpt.pt at step {self.step}")
        return 0
