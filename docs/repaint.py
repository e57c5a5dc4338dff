"""Does RePaint's resampling (Lugmayr et al. 2022) help the bundled model inpaint? CIFAR-10 test images with their
centre square (half the side) hidden, filled by DDIM with η = 1 (RePaint needs a stochastic sampler) over S steps,
with and without resampling: after each step (the known pixels pasted back, as `inpaint` does) the chain
jumps back one step by q(x_t | x_{t'}) and redoes it, r times. The score is the error in the hole against the
hidden pixels: the mean squared error, and the same for the ring of pixels along the hole's edge (the seam).

    python docs/repaint.py --data /tmp/cifar10/test --n 100 --steps 25 --r 1 5 --check
    python docs/repaint.py --data /tmp/cifar10/test --n 100 --steps 121 --r 1     # the cost of r = 5 at 25 steps
"""
import argparse, os, sys, time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm_tool import data, sampling  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--ckpt", default="samples/cifar10_small.pt")
p.add_argument("--data", required=True)
p.add_argument("--n", type=int, default=100)
p.add_argument("--steps", type=int, default=25)
p.add_argument("--r", type=int, nargs="+", default=[1, 5])
p.add_argument("--seed", type=int, default=0)
p.add_argument("--check", action="store_true", help="first check that r = 1 is the inpaint command, bit for bit")
args = p.parse_args()
run = sampling.load_run(args.ckpt, "cpu")
model = run.model
d = run.diffusion
classes = run.classes
S = run.cfg["image_size"]
pick = data.random_subset(args.n, args.seed)
images, labels, names = data.load_images(args.data, image_size=S, pick=pick)
x_true = images.float() / 127.5 - 1
y = torch.tensor([classes.index(names[c]) for c in labels.tolist()])
known = sampling.load_mask(None, S).expand(args.n, 1, S, S)
hole = (known == 0).expand_as(x_true)
ring = torch.zeros_like(known)
ring[..., S // 4:S // 4 + S // 2, S // 4:S // 4 + S // 2] = 1
ring[..., S // 4 + 1:S // 4 + S // 2 - 1, S // 4 + 1:S // 4 + S // 2 - 1] = 0
ring = (ring > 0).expand_as(x_true)
x_known = torch.where(known > 0, x_true, torch.zeros(1))
ts = d.sampling_steps(args.steps)
a = d.alphas_cumprod.tolist()


def ddim_step(x, i, g):
    """One step of Diffusion.ddim_sample_loop with η = 1, from ts[i] to ts[i − 1], the known pixels pasted."""
    t = torch.full((len(x),), ts[i], dtype=torch.long)
    z = torch.randn(x.shape, generator=g) if i > 0 else 0
    pred_x0 = d.predict_x0(model, x, t, y, 2.0)
    at, ap = a[ts[i]], (a[ts[i - 1]] if i > 0 else 1.0)
    eps = (x - at ** 0.5 * pred_x0) / (1 - at) ** 0.5
    sigma = ((1 - ap) / (1 - at) * (1 - at / ap)) ** 0.5
    x_prev = ap ** 0.5 * pred_x0 + max(1 - ap - sigma ** 2, 0.0) ** 0.5 * eps + sigma * z
    return d.paste_known(x_prev, ts, i, (x_known, known), g)


@torch.inference_mode()
def inpaint(r, g):
    """Each step but the last redone r times, going back by q(x_t | x_{t'}) = N(sqrt(ᾱ_t/ᾱ_{t'}) x_{t'},
    (1 − ᾱ_t/ᾱ_{t'}) I) in between."""
    x = torch.randn(x_true.shape, generator=g)
    for i in reversed(range(len(ts))):
        for k in range(r if i > 0 else 1):
            x_prev = ddim_step(x, i, g)
            if k < r - 1:
                ratio = a[ts[i]] / a[ts[i - 1]]
                x = ratio ** 0.5 * x_prev + (1 - ratio) ** 0.5 * torch.randn(x.shape, generator=g)
        x = x_prev
    return x


if args.check:  # r = 1 is `inpaint` with DDIM, η = 1: the same bits
    check = d.sample(model, args.n, y, 2.0, args.steps, 1.0, torch.Generator().manual_seed(args.seed),
                     known=(x_known, known))
    assert torch.equal(check, inpaint(1, torch.Generator().manual_seed(args.seed)))

for r in args.r:
    start = time.time()
    x = inpaint(r, torch.Generator().manual_seed(args.seed))
    assert torch.equal(x[~hole], x_true[~hole])
    mse_hole = ((x - x_true)[hole] ** 2).mean().item()
    mse_ring = ((x - x_true)[ring] ** 2).mean().item()
    print(f"r {r}: hole MSE {mse_hole:.4f}, seam MSE {mse_ring:.4f} ({time.time() - start:.0f} s, n {args.n}, "
          f"DDIM {args.steps} steps, eta 1)")
