"""Peak memory and time a step of Ho et al.'s 114M-parameter network at 256 px, batch 2, as `train` runs it: plain,
with --grad-checkpoint (activation checkpointing), and with --micro-batch 1. Each variant is a process of its own:
peak resident memory by /usr/bin/time, seconds a step between the steps after the first (Trainer.periodic timed).

    python docs/bench_checkpoint.py --steps 4
"""
import argparse, json, os, re, subprocess, sys, tempfile

import numpy as np
from PIL import Image

CHILD = """
import json, sys, time
sys.path.insert(0, {here!r})
from ddpm_tool import cli, trainer
marks = []
periodic = trainer.Trainer.periodic


def timed(self, lr):  # called after each step
    marks.append(time.perf_counter())
    return periodic(self, lr)


trainer.Trainer.periodic = timed
assert cli.main({argv!r}) == 0
print(json.dumps([b - a for a, b in zip(marks[1:], marks[2:])]))
"""
p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=4)
p.add_argument("--size", type=int, default=256)
args = p.parse_args()
here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
work = tempfile.mkdtemp()
rng = np.random.default_rng(0)
os.makedirs(os.path.join(work, "data"))
for i in range(2):
    Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(f"{work}/data/{i}.png")
rows = []
for name, extra in [("plain", []), ("--grad-checkpoint", ["--grad-checkpoint"]), ("--micro-batch 1", ["--micro-batch",
                                                                                                        "1"])]:
    out = os.path.join(work, re.sub(r"\W+", "", name))
    argv = ["train", "--data", f"{work}/data", "--out", out, "--image-size", str(args.size), "--batch-size", "2",
            "--steps", str(args.steps), "--log-every", "1", "--sample-every", "0", "--save-every", str(10 ** 6),
            "--num-workers", "1", "--device", "cpu", *extra]
    run = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", CHILD.format(here=here, argv=argv)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    seconds = json.loads(run.stdout.strip().split("\n")[-1])
    peak_kb = int(run.stderr.strip().split("\n")[-1])
    losses = re.findall(r"loss ([\d.]+)", open(os.path.join(out, "log.txt")).read())
    rows.append((name, peak_kb / 2 ** 20, np.mean(seconds), np.std(seconds), losses))
print(f"{args.size} px, batch 2, {args.steps} steps (the first not timed); {os.cpu_count()} CPU cores")
print("| variant | peak memory (GiB) | seconds a step | loss at each step |")
print("|---|---|---|---|")
for name, gib, mean, std, losses in rows:
    print(f"| {name} | {gib:.2f} | {mean:.1f} ± {std:.1f} | {' '.join(losses)} |")
