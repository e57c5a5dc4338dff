"""
trackers.py: a training run's numbers and pictures, also in TensorBoard and in Weights & Biases, as `ddpm.py train
--report-to tensorboard,wandb` asks: each optional (pip install tensorboard, or wandb) and imported only when asked
for. It imports nothing from ddpm.py or the rest of the tool.

    trackers = Trackers(dict(report_to=("tensorboard",), out="runs/mine"), step=0)
    trackers.log(100, loss=0.031, samples=pil_image)     # numbers as scalars, PIL images as images
    trackers.close()
"""
import os

from PIL import Image


class Trackers:
    """log.txt's scalars and each preview grid, also in TensorBoard (<out>/tensorboard/) and W&B (project $WANDB_PROJECT
    or "ddpm", the run named after its folder, its files in <out>/wandb/; WANDB_MODE=offline needs no network). A
    resumed run continues them: the same TensorBoard folder, purged after the checkpoint's step (log.txt repeats the
    steps after it), and the W&B run whose id the config keeps."""
    def __init__(self, cfg, step):
        self.tensorboard = None
        self.wandb = None
        if "tensorboard" in cfg["report_to"]:
            from torch.utils.tensorboard import SummaryWriter
            purge = step + 1 if step else None  # hide what the last run logged after its checkpoint
            self.tensorboard = SummaryWriter(os.path.join(cfg["out"], "tensorboard"), purge_step=purge)
        if "wandb" in cfg["report_to"]:
            import wandb
            cfg["wandb_id"] = cfg.get("wandb_id") or os.urandom(4).hex()  # saved with the config
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "ddpm"), id=cfg["wandb_id"], dir=cfg["out"],
                                    name=os.path.basename(os.path.normpath(cfg["out"])), resume="allow", config=cfg)
            self.wandb.define_metric("*", step_metric="step")  # our step, not W&B's count of log calls

    def log(self, step, **values):
        """Numbers as scalars, PIL images as images, at the training step `step`."""
        import numpy as np
        for name, v in values.items():
            if self.tensorboard and isinstance(v, Image.Image):
                self.tensorboard.add_image(name, np.asarray(v), step, dataformats="HW" if v.mode == "L" else "HWC")
            elif self.tensorboard:
                self.tensorboard.add_scalar(name, v, step)
        if self.wandb:
            import wandb
            self.wandb.log({"step": step, **{k: wandb.Image(v) if isinstance(v, Image.Image) else v
                                             for k, v in values.items()}})

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
