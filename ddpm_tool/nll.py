"""
nll.py: the negative log-likelihood bound of images in bits/dim, as Ho et al. report it (Table 2): the variational bound
L = L_T + Σ_{t>1} L_{t−1} + L_0 (Eq. 5), summed over its T terms, each of which a Diffusion computes (ddpm.py:
prior_bpd, vb_terms_bpd), with x_t drawn once for each term as Ho et al.'s calc_bpd_loop draws it; or, where T
network calls an image cost too much (a CPU), an unbiased stratified estimate of the sum from K terms. It imports
nothing from ddpm.py or the rest of the tool: any object with q_sample, vb_terms_bpd, prior_bpd and num_timesteps
serves.

    prior, decoder, kl = bits_per_dim(model, diffusion, images)           # uint8 images (N, C, H, W)
    print((prior + decoder + kl).mean())                                   # bits/dim, ≤ 3.75 for Ho et al.'s model
"""
import torch
from tqdm import tqdm


@torch.inference_mode()
def bits_per_dim(model, diffusion, images, batch_size=64, t_samples=None, seed=0, progress=True):
    """The variational bound (Eq. 5) of each of the uint8 images (N, C, H, W), in bits/dim → its terms (prior L_T,
    decoder L_0, the KL terms L_{t−1} summed), each (N,) float64 on the CPU. t_samples None: all T terms, with x_t
    drawn once for each (as Ho et al.'s calc_bpd_loop). t_samples K: K of the T − 1 KL terms, stratified: the first
    E = K // 2 (t = 1 … E, the largest: the bundled model has 55% of the sum in t ≤ 10) exactly, and K − E of the
    others drawn uniformly without replacement, scaled by (T − 1 − E) / (K − E): unbiased for the sum, with 1/15 of
    the spread of K terms drawn from all (docs/nll_terms.py). The calls go in batches of batch_size (image, t)."""
    T = diffusion.num_timesteps
    n = len(images)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    exact = T - 1 if t_samples is None else t_samples // 2
    ts = torch.arange(exact + 1).repeat(n, 1)  # t = 0 (the decoder), then the first KL terms
    if t_samples is not None:
        drawn = [torch.randperm(T - 1 - exact, generator=g)[:t_samples - exact] + exact + 1 for _ in range(n)]
        ts = torch.cat([ts, torch.stack(drawn)], dim=1)
    rows = torch.arange(n).repeat_interleave(ts.shape[1])
    ts = ts.flatten()
    terms = []
    for chunk in tqdm(torch.arange(len(ts)).split(batch_size), "network calls", disable=None if progress else True):
        x0 = images[rows[chunk]].to(device).float() / 127.5 - 1
        t = ts[chunk].to(device)
        x_t = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g).to(device))
        terms.append(diffusion.vb_terms_bpd(model, x0, x_t, t).double().cpu())
    prior = [diffusion.prior_bpd(x.to(device).float() / 127.5 - 1).double().cpu() for x in images.split(batch_size)]
    prior = torch.cat(prior)
    terms = torch.cat(terms).view(n, -1)
    kl = terms[:, 1:exact + 1].sum(1)
    if t_samples is not None:
        kl = kl + terms[:, exact + 1:].sum(1) * ((T - 1 - exact) / (t_samples - exact))
    return prior, terms[:, 0], kl
