"""How many t an image `nll --t-samples` should draw on a CPU: every term of the bound for a few images, then the
standard error that K of the T − 1 KL terms would give (sampling without replacement, scaled by (T − 1)/K).

    python docs/nll_terms.py --ckpt samples/cifar10_small.pt --data /tmp/cifar10/test --n 4
"""
import argparse, math, os, sys, time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddpm  # noqa: E402
from ddpm_tool import data, sampling  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--ckpt", default="samples/cifar10_small.pt")
p.add_argument("--data", required=True)
p.add_argument("--n", type=int, default=4)
p.add_argument("--batch-size", type=int, default=64)
args = p.parse_args()
run = sampling.load_run(args.ckpt, "cpu")
model = run.model
d = ddpm.Diffusion(run.cfg["timesteps"], run.cfg["schedule"], "fixedlarge")
T = d.num_timesteps
pick = data.random_subset(args.n, 0)
images = data.load_images(args.data, image_size=None, pick=pick)[0]
g = torch.Generator().manual_seed(0)
terms = torch.zeros(args.n, T, dtype=torch.float64)
start = time.time()
with torch.inference_mode():
    for i in range(args.n):
        x0 = images[i:i + 1].float().expand(T, -1, -1, -1) / 127.5 - 1
        for chunk in torch.arange(T).split(args.batch_size):
            x_t = d.q_sample(x0[chunk], chunk, torch.randn(x0[chunk].shape, generator=g))
            terms[i, chunk] = d.vb_terms_bpd(model, x0[chunk], x_t, chunk).double()
seconds = time.time() - start
if os.environ.get("SAVE"):
    torch.save(terms, os.environ["SAVE"])
print(f"{args.n * T} network calls in {seconds:.1f} s: {args.n * T / seconds:.1f} calls/s")
kl = terms[:, 1:]
print(f"per image: decoder L_0 {terms[:, 0].tolist()}, KL sum {kl.sum(1).tolist()}")
print("share of the KL sum in t = 1..10:", (kl[:, :10].sum(1) / kl.sum(1)).tolist())
N = T - 1
print(f"images' own spread (std of their bounds): {terms.sum(1).std().item():.3f} bits/dim")
for K in (10, 20, 50, 100, 200, 400):
    # the t-sampling standard error of one image's estimate: S of M terms drawn without replacement, scaled by M/S,
    # has the variance M² s² (1 − S/M) / S, s² the variance of those M terms over t
    for E, how in ((0, "all drawn"), (K // 2, "first K/2 exact (ddpm.py)")):
        rest = kl[:, E:]
        M, S = rest.shape[1], K - E
        se = [math.sqrt(M * M * rest[i].var().item() * (1 - S / M) / S) for i in range(args.n)]
        print(f"K {K:4d}, {how:26}: t-sampling standard error {sum(se) / len(se):.4f} bits/dim, {K + 1} calls")
