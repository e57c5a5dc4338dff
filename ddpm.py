"""
ddpm.py: Denoising Diffusion Probabilistic Models, the method in one file.

    DDPM    Ho, Jain & Abbeel 2020, https://arxiv.org/abs/2006.11239  (Eq. and Algorithm numbers)
    DDIM    Song, Meng & Ermon 2020, https://arxiv.org/abs/2010.02502  (fewer sampling steps)
    DPM++   Lu et al. 2022, https://arxiv.org/abs/2211.01095  (DPM-Solver++: second order)
    CFG     Ho & Salimans 2022, https://arxiv.org/abs/2207.12598  (classifier-free guidance)
    cosine  Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672  (cosine noise schedule)
    v       Salimans & Ho 2022, https://arxiv.org/abs/2202.00512  (v-prediction)
    MinSNR  Hang et al. 2023, https://arxiv.org/abs/2303.09556  (Min-SNR-γ loss weights)
    SR3     Saharia et al. 2021, https://arxiv.org/abs/2104.07636  (p(x | c): super-resolution)
    Palette Saharia et al. 2022, https://arxiv.org/abs/2111.05826  (p(x | c): colourisation)

The method, top to bottom: schedule and math, samplers, U-Net, EMA, Algorithm 1's step. It needs
only torch and tqdm: copied alone into a project, it trains and samples. The tool that runs it,
the package ddpm_tool/ beside this file, is its command line: `python ddpm.py --help` lists them.

Notation: T steps, 0-based in code: code t is the paper's t + 1 (t = 0: the last denoising step).
β_t is the noise variance of step t, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s. Data x_0 is in [-1, 1];
x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε, ε ~ N(0, I); the network predicts ε: ε̂ = ε_θ(x_t, t, y)
(or v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0, or x_0: Diffusion's `prediction`).
"""
import copy
import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.special import log_ndtr, ndtr
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm


# ======== 1. Noise schedule and diffusion math ====================================================
def make_betas(schedule, timesteps):
    """β_0 … β_{T−1}, a (T,) float64 tensor: ᾱ is a product of 1000 numbers near 1."""
    if schedule == "linear":
        # Ho et al.: 1e-4 → 0.02 for T = 1000; × 1000/T, so any T ends at ᾱ_{T−1} ≈ 0 (pure noise)
        scale = 1000 / timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    elif schedule == "cosine":
        # Nichol & Dhariwal Eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2)
        steps = torch.arange(timesteps + 1, dtype=torch.float64)
        f = torch.cos((steps / timesteps + 0.008) / 1.008 * math.pi / 2) ** 2  # s = 0.008
        betas = 1 - f[1:] / f[:-1]                                  # β_t = 1 − ᾱ_t / ᾱ_{t−1}
    else:
        raise ValueError(f"unknown schedule {schedule!r}: use 'linear' or 'cosine'")
    return betas.clamp(max=0.999)  # β = 1 would make ᾱ = 0, x̂_0 undefined (cosine, tiny T)


def _extract(a, t, x):
    """a[t] for a (T,) schedule and steps t (B,), shaped (B, 1, …, 1) to broadcast against x."""
    return a.to(t.device)[t].view(-1, *([1] * (x.dim() - 1)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    ratio = torch.exp(logvar1 - logvar2)
    return 0.5 * (-1.0 + logvar2 - logvar1 + ratio + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log P(x's bin) under N(mean, e^{2 log_scale}) (Eq. 13): x in [-1, 1] at the 256 values
    2k/255 − 1, bins 2/255 wide, the lowest open to −∞ and the highest to +∞. The exact normal
    CDF Φ (Ho et al. use a tanh approximation: it differs in the 4th digit)."""
    # In float64: float32's Φ loses small bins' mass to rounding (20% at 1e-7).
    upper = ((x - mean + 1 / 255) * torch.exp(-log_scale)).double()
    lower = ((x - mean - 1 / 255) * torch.exp(-log_scale)).double()
    # Φ(upper) − Φ(lower), taken on the side of 0 where the two do not cancel
    bin_mass = torch.where(lower > 0, ndtr(-lower) - ndtr(-upper), ndtr(upper) - ndtr(lower))
    log_probs = torch.where(x > 0.999, log_ndtr(-lower), bin_mass.clamp(min=1e-12).log())
    return torch.where(x < -0.999, log_ndtr(upper), log_probs).to(x.dtype)


class Diffusion:
    """q, p_θ, the loss, the bound, the samplers. Schedules: (T,) float32 made in float64; t: (B,)
    LongTensor of 0-based steps; x: (B, C, H, W) in [-1, 1]; `model(x_t, t, y, c)` → ε̂ (v, x_0)."""
    def __init__(self, timesteps=1000, schedule="linear", variance="fixedlarge", device=None,
                 prediction="eps"):
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"unknown prediction {prediction!r}: use 'eps', 'v' or 'x0'")
        self.num_timesteps = timesteps
        self.prediction = prediction  # what the network outputs: ε (Ho et al.), v or x_0
        betas = make_betas(schedule, timesteps)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)                             # ᾱ_t
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)  # ᾱ_{t−1}, 1 at t = 0
        # Eq. 7: β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t; 0 at t = 0, where x_1 determines x_0.
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        # σ²_t of p_θ (Sec. 3.2): β_t ("fixedlarge", Ho et al.'s CIFAR-10) or β̃_t ("fixedsmall");
        # β̃ of code t = 1 stands in at t = 0, as in their code: log σ² stays finite there.
        clipped = posterior_variance[1:2]
        variances = dict(fixedlarge=torch.cat([clipped, betas[1:]]), fixedsmall=posterior_variance)
        model_variance = variances[variance]  # KeyError for any other name
        tensors = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=alphas_cumprod.rsqrt(),
            sqrt_recipm1_alphas_cumprod=(1 / alphas_cumprod - 1).sqrt(),
            posterior_variance=posterior_variance,
            model_variance=model_variance,
            model_log_variance=torch.cat([clipped, model_variance[1:]]).log(),
            posterior_log_variance_clipped=torch.cat([clipped, posterior_variance[1:]]).log(),
            # Eq. 7: μ̃_t(x_t, x_0) = coef1 · x_0 + coef2 · x_t, with
            # coef1 = sqrt(ᾱ_{t−1}) β_t / (1 − ᾱ_t) and coef2 = sqrt(α_t) (1 − ᾱ_{t−1}) / (1 − ᾱ_t)
            posterior_mean_coef1=alphas_cumprod_prev.sqrt() * betas / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - betas).sqrt() * (1 - alphas_cumprod_prev)
            / (1 - alphas_cumprod),
        )
        # On the data's device: indexing them then needs no host sync.
        for name, value in tensors.items():
            setattr(self, name, value.to(device, torch.float32))

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0) for ε = noise. Eq. 4: x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε"""
        signal = _extract(self.sqrt_alphas_cumprod, t, x0) * x0
        return signal + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def predict_x0_from_eps(self, x_t, t, eps):
        """Eq. 4 solved for x_0: x_0 = sqrt(1/ᾱ_t) x_t − sqrt(1/ᾱ_t − 1) ε."""
        scaled = _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
        return scaled - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean and variance of q(x_{t−1} | x_t, x_0) (Eqs. 6-7); the variance is (B, 1, 1, 1)."""
        from_x0 = _extract(self.posterior_mean_coef1, t, x_t) * x0
        mean = from_x0 + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _extract(self.posterior_variance, t, x_t)

    def model_output(self, model, x_t, t, y=None, guidance=1.0, cond=None):
        """The network's output, guided if y is given and guidance s ≠ 1: ε̃ = ε_u + s (ε_c − ε_u),
        ε_u for the null label (index model.num_classes). s = 1: conditional, 0: unconditional (Ho
        & Salimans' w = s − 1). v and x_0 are linear in ε at a given x_t: guided alike."""
        if y is None or guidance == 1.0:
            return model(x_t, t, y, cond).float()
        null = torch.full_like(y, model.num_classes)
        both = None if cond is None else torch.cat([cond, cond])  # the image, seen by both halves
        # Both halves in one batched forward (as DiT's sample.py): one pass over the weights.
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]), both).float()
        out_c, out_u = out.chunk(2)
        return out_u + guidance * (out_c - out_u)

    def eps_and_x0(self, x_t, t, out):
        """(ε̂, x̂_0) from the network's output, whatever it predicts: derived here alone, so every
        sampler, guidance, inpainting and the bound work for any prediction."""
        a = _extract(self.sqrt_alphas_cumprod, t, x_t)                              # sqrt(ᾱ_t)
        s = _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)                    # sqrt(1 − ᾱ_t)
        if self.prediction == "v":  # v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0 and Eq. 4 give
            # ε = sqrt(1 − ᾱ_t) x_t + sqrt(ᾱ_t) v and x_0 = sqrt(ᾱ_t) x_t − sqrt(1 − ᾱ_t) v
            return s * x_t + a * out, a * x_t - s * out
        if self.prediction == "x0":  # Eq. 4 solved for ε: sqrt(1/ᾱ_t) x_t − x_0 = sqrt(1/ᾱ_t − 1) ε
            eps = _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - out
            return eps / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t), out
        return out, self.predict_x0_from_eps(x_t, t, out)

    def predict_eps(self, model, x_t, t, y=None, guidance=1.0, cond=None):
        """ε̂ from the (guided) output."""
        return self.eps_and_x0(x_t, t, self.model_output(model, x_t, t, y, guidance, cond))[0]

    def predict_x0(self, model, x_t, t, y=None, guidance=1.0, cond=None):
        """x̂_0 from the (guided) output, clipped: what every sampler steps with."""
        out = self.model_output(model, x_t, t, y, guidance, cond)
        # Clip x̂_0, not x_t: data lies in [-1, 1], and an x̂_0 out of range pulls the mean off it.
        return self.eps_and_x0(x_t, t, out)[1].clamp(-1, 1)

    def p_mean_variance(self, model, x_t, t, y=None, guidance=1.0, cond=None):
        """Mean and variance of p_θ(x_{t−1} | x_t), and the clipped x̂_0 of the mean."""
        pred_x0 = self.predict_x0(model, x_t, t, y, guidance, cond)
        mean, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)  # Eq. 11, written through x̂_0
        return mean, _extract(self.model_variance, t, x_t), pred_x0

    def training_loss(self, model, x0, y=None, p_uncond=0.0, generator=None, part=slice(None),
                      loss="l2", snr_gamma=0.0, cond=None):
        """Algorithm 1's loss: t ~ U{0, …, T−1}, ε ~ N(0, I), ‖ε − ε_θ(x_t, t)‖², the pixel mean
        (Eq. 14; "l1": |ε − ε̂|; "huber": smooth L1, β = 1), or v's or x_0's error for those
        predictions. A label becomes the null label with probability p_uncond: one network learns
        ε_c and guidance's ε_u. t, ε and the drops are drawn for the whole batch, the loss is over
        x0[part] (processes share the draws). snr_gamma γ > 0: Min-SNR-γ weights (Hang et al.
        2023), min(SNR_t, γ) times x_0's error, SNR_t = ᾱ_t / (1 − ᾱ_t): the easy low-noise
        steps stop dominating the gradient. cond: the images c of p(x | c), beside x_t."""
        batch = x0.shape[:1]
        t = torch.randint(0, self.num_timesteps, batch, generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        if y is not None and p_uncond > 0:
            drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
            y = torch.where(drop, torch.full_like(y, model.num_classes), y)
        y_part = None if y is None else y[part]
        cond_part = None if cond is None else cond[part]
        x0 = x0[part]
        t = t[part]
        noise = noise[part]
        out = model(self.q_sample(x0, t, noise), t, y_part, cond_part).float()  # fp32 in autocast
        target = x0 if self.prediction == "x0" else noise  # x_0, or ε (Eq. 14)
        if self.prediction == "v":  # v = sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) x_0: Eq. 4, ε and −x_0 swapped
            target = self.q_sample(noise, t, -x0)
        losses = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": F.smooth_l1_loss}
        if not snr_gamma:
            return losses[loss](out, target)
        per_image = losses[loss](out, target, reduction="none").flatten(1).mean(1)
        snr = self.alphas_cumprod[t] / (1 - self.alphas_cumprod[t])
        # ‖ε − ε̂‖² = SNR ‖x_0 − x̂_0‖² and ‖v − v̂‖² = (SNR + 1) ‖x_0 − x̂_0‖²: each divisor
        # makes the weighted loss min(SNR, γ) ‖x_0 − x̂_0‖², whatever the network predicts
        divisors = dict(eps=snr, v=snr + 1, x0=torch.ones_like(snr))
        return (per_image * snr.clamp(max=snr_gamma) / divisors[self.prediction]).mean()

    # ---- The variational bound L = L_T + Σ_{t>1} L_{t−1} + L_0 (Eq. 5), in bits per dimension
    def prior_bpd(self, x0):
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) of each image (B,): near 0, as ᾱ_{T−1} is."""
        t = torch.full(x0.shape[:1], self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean = _extract(self.sqrt_alphas_cumprod, t, x0) * x0
        log_var = _extract(self.sqrt_one_minus_alphas_cumprod, t, x0).log() * 2
        kl = normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))
        return kl.flatten(1).mean(1) / math.log(2)  # nats → bits

    def vb_terms_bpd(self, model, x0, x_t, t, y=None):
        """The bound's term at step t of each image (B,): L_{t−1} = KL(q(x_{t−1} | x_t, x_0) ‖
        p_θ(x_{t−1} | x_t)) for t ≥ 1, and L_0 = −log p_θ(x_0 | x_1) (Eq. 13) at t = 0. As Ho et
        al.'s _vb_terms_bpd: the mean from the clipped x̂_0, log σ² clipped at t = 0."""
        true_mean, _ = self.q_posterior_mean_variance(x0, x_t, t)
        true_log_var = _extract(self.posterior_log_variance_clipped, t, x_t)
        mean, _, _ = self.p_mean_variance(model, x_t, t, y)
        log_var = _extract(self.model_log_variance, t, x_t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).flatten(1).mean(1)
        log_p = discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1)
        return torch.where(t == 0, -log_p, kl) / math.log(2)

    def sampling_steps(self, steps=None, spacing="uniform"):
        """The t a sampler visits, ascending from 0 to T − 1: all T (steps=None), or `steps` of
        them spaced "uniform" or "quadratic" in t (DDIM's CIFAR-10 figures: dense near the data),
        or "logsnr": uniform in λ_t = log(sqrt(ᾱ_t) / sqrt(1 − ᾱ_t)) (DPM-Solver's authors)."""
        T = self.num_timesteps
        if steps is None:
            return list(range(T))
        u = torch.linspace(0, 1, steps, dtype=torch.float64)
        if spacing == "uniform":
            ts = torch.linspace(0, T - 1, steps)
        elif spacing == "quadratic":
            ts = u ** 2 * (T - 1)
        elif spacing == "logsnr":  # the step whose λ is nearest to each of `steps` evenly spaced λ
            a = self.alphas_cumprod.double()
            lam = (a / (1 - a)).log() / 2                                          # falls with t
            targets = lam[0] + u * (lam[-1] - lam[0])
            ts = (lam[None] - targets[:, None]).abs().argmin(1).double()
        else:
            raise ValueError(f"unknown spacing {spacing!r}: use 'uniform', 'quadratic' or 'logsnr'")
        ts = ts.round().long().tolist() + [T]
        # Every sampler starts at the noise x_{T−1} (one step: from there straight to x̂_0).
        ts[steps - 1] = T - 1
        for i in range(1, steps):  # where rounding crowds steps together, move them apart ...
            ts[i] = max(ts[i], ts[i - 1] + 1)
        for i in reversed(range(steps)):  # ... and keep them below T: `steps` distinct t
            ts[i] = min(ts[i], ts[i + 1] - 1)
        return ts[:-1]

    # ---- The samplers: one function each, one signature. From x = x_{ts[-1]} down the steps ts,
    # ---- then x_0. callback(t, x_t, x̂_0) is called at every step; at t = 0, x̂_0 is the result.
    @torch.inference_mode()
    def sample(self, model, n, y=None, guidance=1.0, steps=None, eta=0.0, generator=None,
               noise=None, progress=False, callback=None, sampler=None, spacing="uniform",
               known=None, image=None, strength=1.0, cond=None):
        """n images (n, C, H, W) in [-1, 1] from x_{T−1} = noise ~ N(0, I). sampler: "ancestral"
        (the default for steps=None: Algorithm 2 over all T steps), "ddim" (the default for steps=S:
        the S steps of sampling_steps(S, spacing)) or "dpm++" (DPM-Solver++(2M) over them). known:
        inpaint (paste_known). image, strength: SDEdit (Meng et al. 2021), from image noised by
        q(x_t | x_0) to t = strength · (T − 1); strength 0 returns the image. cond: (n, C', H, W),
        the conditioning images of a model that takes them (p(x | c): SR3, Palette)."""
        if sampler is None:
            sampler = "ancestral" if steps is None else "ddim"
        loops = {"ancestral": self.p_sample_loop, "ddim": self.ddim_sample_loop,
                 "dpm++": self.dpm_solver_sample_loop}
        if sampler not in loops or (sampler == "ancestral" and steps is not None):
            raise ValueError(f"sampler {sampler!r} with steps={steps}: ancestral takes all T "
                             "steps, ddim and dpm++ any")
        if sampler == "dpm++" and known is not None and len(known) > 2 and known[2] > 1:
            raise ValueError("resampling needs ancestral or ddim: DPM-Solver++ has a memory")
        size = model.image_size  # (H, W), or one side
        if isinstance(size, int):
            size = (size, size)
        shape = (n, model.in_channels, *size)
        device = next(model.parameters()).device
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
        x = x.to(device)
        ts = self.sampling_steps(steps, spacing)
        if image is not None and strength == 0:
            return image.to(device)
        if image is not None and strength < 1:  # at 1, x_{T−1} is the noise: plain sampling
            t_start = round(strength * (self.num_timesteps - 1))
            ts = [t for t in ts if t < t_start] + [t_start]
            x = self.q_sample(image.to(device), torch.full((n,), t_start, device=device), x)
        options = {"eta": eta} if sampler == "ddim" else {}
        cond = None if cond is None else cond.to(device)
        return loops[sampler](model, x, ts, y, guidance, generator, callback, progress, known, cond,
                              **options)

    def p_sample_loop(self, model, x, ts, y=None, guidance=1.0, generator=None, callback=None,
                      progress=False, known=None, cond=None):
        """Algorithm 2: x_{t−1} = μ_θ(x_t, t) + σ_t z over all T steps (ts: every t)."""
        for i, t, again in _countdown(ts, x, progress, known):
            # z ~ N(0, I), and no noise at the last step
            z = torch.randn(x.shape, generator=generator, device=x.device) if i > 0 else 0
            mean, var, pred_x0 = self.p_mean_variance(model, x, t, y, guidance, cond)
            x_prev = mean + var.sqrt() * z
            if callback is not None:
                callback(ts[i], x, pred_x0)
            x = self.paste_known(x_prev, ts, i, known, generator, again)
        return x

    def ddim_sample_loop(self, model, x, ts, y=None, guidance=1.0, generator=None, callback=None,
                         progress=False, known=None, cond=None, eta=0.0):
        """DDIM (Song et al.) over the steps ts: eta 0 deterministic, 1 DDPM-like (σ²_t = β_t, the
        ancestral sampler's, is very bad with few steps: their Table 1)."""
        alphas_cumprod = self.alphas_cumprod.tolist()  # floats: no device syncs in the loop
        for i, t, again in _countdown(ts, x, progress, known):
            noisy = i > 0 and eta > 0
            z = torch.randn(x.shape, generator=generator, device=x.device) if noisy else 0
            pred_x0 = self.predict_x0(model, x, t, y, guidance, cond)
            a = alphas_cumprod[ts[i]]
            a_prev = alphas_cumprod[ts[i - 1]] if i > 0 else 1.0  # 1.0: x_0 itself
            # Re-derive ε from the clipped x̂_0 so the step stays on the line between x̂_0 and x_t.
            eps = (x - a ** 0.5 * pred_x0) / (1 - a) ** 0.5
            # DDIM Eq. 16: σ = η sqrt((1 − ᾱ_prev) / (1 − ᾱ_t)) sqrt(1 − ᾱ_t / ᾱ_prev)
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
            # DDIM Eq. 12: x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 − ᾱ_prev − σ²) ε + σ z
            direction = max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
            x_prev = a_prev ** 0.5 * pred_x0 + direction + sigma * z
            if callback is not None:
                callback(ts[i], x, pred_x0)
            x = self.paste_known(x_prev, ts, i, known, generator, again)
        return x

    def dpm_solver_sample_loop(self, model, x, ts, y=None, guidance=1.0, generator=None,
                               callback=None, progress=False, known=None, cond=None):
        """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) over ts: with α = sqrt(ᾱ), σ = sqrt(1 − ᾱ),
        λ = log(α/σ), each step solves the flow ODE for x̂_0 linear in λ through this and the last
        x̂_0. First order (DDIM, η = 0): the first step, and below 15 steps the one into t = 0."""
        alphas_cumprod = self.alphas_cumprod.tolist()
        last_x0 = None  # x̂_0 and h of the previous step
        h_last = None
        for i, t, again in _countdown(ts, x, progress, known):
            pred_x0 = self.predict_x0(model, x, t, y, guidance, cond)
            a = alphas_cumprod[ts[i]]
            if i == 0:  # to σ = 0: h = ∞, e^{−h} = 0, and the update is x̂_0 itself
                x_prev = pred_x0
            else:
                a_prev = alphas_cumprod[ts[i - 1]]
                h = math.log(a_prev / (1 - a_prev)) / 2 - math.log(a / (1 - a)) / 2  # λ_i − λ_{i−1}
                d = pred_x0
                if last_x0 is not None and not (i == 1 and len(ts) < 15):
                    r = h_last / h                                          # r_i = h_{i−1} / h_i
                    # D_i = (1 + 1/2r_i) x̂_0 − (1/2r_i) x̂_0,prev
                    d = (1 + 1 / (2 * r)) * pred_x0 - 1 / (2 * r) * last_x0
                # x_i = (σ_i / σ_{i−1}) x_{i−1} − α_i (e^{−h_i} − 1) D_i
                x_prev = ((1 - a_prev) / (1 - a)) ** 0.5 * x - a_prev ** 0.5 * math.expm1(-h) * d
                h_last = h
            last_x0 = pred_x0
            if callback is not None:
                callback(ts[i], x, pred_x0)
            x = self.paste_known(x_prev, ts, i, known, generator, again)
        return x

    def paste_known(self, x_prev, ts, i, known=None, generator=None, again=False):
        """Inpainting: x_{t−1}'s known pixels (t − 1 = ts[i − 1]) drawn from q(x_{t−1} | x_known)
        (Eq. 4); x_known itself after the last step. known: (x_known, mask: 1 known[, r]) or None.
        again (RePaint's resampling, Lugmayr et al. 2022): then back to ts[i], to redo the step."""
        if known is None:
            return x_prev
        x_known, mask = known[:2]
        if i > 0:
            t = torch.full((len(x_prev),), ts[i - 1], device=x_prev.device, dtype=torch.long)
            noise = torch.randn(x_prev.shape, generator=generator, device=x_prev.device)
            x_known = self.q_sample(x_known, t, noise)
        x = torch.where(mask > 0, x_known, x_prev)
        if again:  # q(x_t | x_t') = N(sqrt(ᾱ_t/ᾱ_t') x_t', (1 − ᾱ_t/ᾱ_t') I), t' = ts[i − 1]
            ratio = (self.alphas_cumprod[ts[i]] / self.alphas_cumprod[ts[i - 1]]).item()
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            x = ratio ** 0.5 * x + (1 - ratio) ** 0.5 * noise
        return x


def slerp(z1, z2, lam):
    """Spherical interpolation of two noises: sin((1 − λ)θ)/sin θ · z1 + sin(λθ)/sin θ · z2, θ their
    angle. A linear mix would shrink the norm a Gaussian noise has, and blur the samples."""
    cos = z1.flatten() @ z2.flatten() / (z1.norm() * z2.norm())
    theta = math.acos(cos.clamp(-1, 1).item())
    a = math.sin((1 - lam) * theta) / math.sin(theta)  # exactly 1 at λ = 0, and 0 at λ = 1
    b = math.sin(lam * theta) / math.sin(theta)
    return a * z1 + b * z2


def _countdown(ts, x, progress=False, known=None):
    """(i, t, again) from the last step of ts to ts[0], t = ts[i] for each image of x: (B,). With
    known = (x_known, mask, r): each step but the last r times (RePaint), again: to be redone."""
    disable = None if progress else True  # None: a progress bar where the output is a terminal
    repeats = known[2] if known is not None and len(known) > 2 else 1
    for i in tqdm(reversed(range(len(ts))), "sampling", len(ts), leave=False, disable=disable):
        t = torch.full((len(x),), ts[i], device=x.device, dtype=torch.long)
        for k in range(repeats if i > 0 else 1):
            yield i, t, i > 0 and k < repeats - 1


# ======== 2. U-Net ε_θ(x_t, t, y): Ho et al.'s CIFAR-10 network ("ddpm_cifar10") ===============
def timestep_embedding(t, dim):
    """Sinusoidal embedding (B,) → (B, dim) of the steps, as in Transformers: [sin, cos](t·f)."""
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(exponents * (-math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def _norm(ch):
    """GroupNorm, never BatchNorm (batch statistics would mix timesteps). 32 groups as in the paper,
    but ≥ 4 channels a group: a one-channel group would subtract the per-channel constant that the
    time embedding adds, blinding the block to t."""
    return nn.GroupNorm(math.gcd(32, max(ch // 4, 1)), ch)


class Downsample(nn.Conv2d):
    """Stride-2 3×3 convolution; same: Ho et al.'s TensorFlow "SAME" padding, 0 before, 1 after."""
    def __init__(self, ch, same=True):
        super().__init__(ch, ch, 3, stride=2, padding=0 if same else 1)
        self.same = same

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)) if self.same else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions, residual."""
    def __init__(self, ch):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        # (B, 3C, H, W) → q, k, v as (B, 1, HW, C): views, no copy, when x is channels_last
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2)[:, None]
        q, k, v = qkv.chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)                      # softmax(q kᵀ/√C) v
        return x + self.proj(h[:, 0].transpose(1, 2).reshape(B, C, H, W))


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, + the projected embedding, GroupNorm, SiLU, dropout, conv, + skip;
    then attention, if asked for. checkpoint: keep only x in training, redo the rest in the
    backward pass (activation checkpointing): most of the activation memory for one more forward."""
    def __init__(self, in_ch, out_ch, emb_ch, dropout, attn=False):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_ch, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Ho et al.'s "nin_shortcut" where the channels change
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = AttnBlock(out_ch) if attn else nn.Identity()
        self.checkpoint = False

    def forward(self, x, emb):
        if self.checkpoint and torch.is_grad_enabled():  # the same dropout mask when redone
            return checkpoint(self.block, x, emb, use_reentrant=False)
        return self.block(x, emb)

    def block(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # time (and class) enter here
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.attn(self.skip(x) + h)


class UNet(nn.Module):
    """ε_θ(x, t, y, c) → ε̂ shaped as x (B, C, H, W); t: (B,) in 0..T−1; y: (B,) labels or None
    (label num_classes is the null label); c: (B, cond_channels, H, W) or None. The defaults are
    Ho et al.'s CIFAR-10 network, 35.7M parameters: 32→16→8→4 px at 128/256/256/256 channels,
    num_res_blocks blocks a level down and one more up (each takes a skip), attention at
    attn_resolutions and in the middle."""
    def __init__(self, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, image_size=32, num_classes=None,
                 same_padding=True, norm_eps=1e-6, cond_channels=0):
        super().__init__()
        if not ch_mult:
            raise ValueError("ch_mult needs at least one level")
        factor = 2 ** (len(ch_mult) - 1)  # each level but the last halves the image
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if size[0] % factor or size[1] % factor:
            raise ValueError(f"image size {image_size} is not divisible by {factor}, which a U-Net "
                             f"with {len(ch_mult)} levels needs")
        self.in_channels = in_channels
        self.ch = ch
        self.image_size = size
        self.num_classes = num_classes
        emb_ch = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.class_emb = nn.Embedding(num_classes + 1, emb_ch) if num_classes else None  # + null
        self.conv_in = nn.Conv2d(in_channels + cond_channels, ch, 3, padding=1)  # x_t and c
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        skips = [ch]  # the channels of every output on the way down
        cur = ch
        res = min(size)  # attention by the feature map's shorter side: 16 means 16×16, 16×32, …
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                attn = res in attn_resolutions
                self.down.append(ResBlock(cur, ch * mult, emb_ch, dropout, attn))
                cur = ch * mult
                skips.append(cur)
            if level < len(ch_mult) - 1:
                self.down.append(Downsample(cur, same_padding))
                res //= 2
                skips.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_ch, dropout, attn=True),
                                  ResBlock(cur, cur, emb_ch, dropout)])
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                attn = res in attn_resolutions
                self.up.append(ResBlock(cur + skips.pop(), ch * mult, emb_ch, dropout, attn))
                cur = ch * mult
            if level > 0:  # upsample: nearest, then a convolution
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2),
                                             nn.Conv2d(cur, cur, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(_norm(cur), nn.SiLU(), nn.Conv2d(cur, in_channels, 3, padding=1))
        for m in self.modules():  # GroupNorm's ε: 1e-6 in Ho et al.'s TensorFlow, 1e-5 in torch
            if isinstance(m, nn.GroupNorm):
                m.eps = norm_eps
        self.initialize()

    def initialize(self):
        """Ho et al.'s init: Xavier-uniform, zero biases, and zero last layers: each residual block
        starts as the identity, and ε̂ as 0."""
        blocks = [m for m in self.modules() if isinstance(m, (ResBlock, AttnBlock))]
        last = [m.conv2 if isinstance(m, ResBlock) else m.proj for m in blocks] + [self.out[-1]]
        for m in self.modules():
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue
            if any(m is z for z in last):
                nn.init.zeros_(m.weight)
            else:
                nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, t, y=None, cond=None):
        if cond is not None:  # SR3 and Palette: the image c concatenated to x_t on the channels
            x = torch.cat([x, cond], dim=1)
        emb = self.time_mlp(timestep_embedding(t, self.ch))                          # (B, 4·ch)
        if self.class_emb is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes)
            emb = emb + self.class_emb(y)
        hs = [self.conv_in(x)]  # every output on the way down: the skips
        for layer in self.down:  # residual blocks take the embedding; downsampling does not
            hs.append(layer(hs[-1], emb) if isinstance(layer, ResBlock) else layer(hs[-1]))
        h = hs[-1]
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:  # each residual block takes one skip; upsampling takes none
            skip = hs.pop() if isinstance(layer, ResBlock) else None
            h = layer(torch.cat([h, skip], dim=1), emb) if skip is not None else layer(h)
        return self.out(h)


# ======== 3. EMA of the weights: what gets sampled from =========================================
class EMA:
    """A shadow copy θ' ← d θ' + (1 − d) θ of the parameters and float buffers, with
    d_n = min(decay, (1 + n) / (10 + n)) after n updates: a plain 0.9999 average would sit at the
    random init for thousands of steps, and short runs would sample noise."""
    def __init__(self, model, decay=0.9999):
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        self.num_updates += 1
        # Parameters and float buffers. Not state_dict(): it would copy each entry on every call.
        shadow = [*self.model.parameters(), *self.model.buffers()]
        shadow = [v for v in shadow if v.is_floating_point()]
        live = [v for v in [*model.parameters(), *model.buffers()] if v.is_floating_point()]
        torch._foreach_lerp_(shadow, live, 1 - d)  # θ' += (1 − d)(θ − θ'), fused

    def state_dict(self):
        model = self.model.state_dict()
        return {"decay": self.decay, "num_updates": self.num_updates, "model": model}

    def load_state_dict(self, state):
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.model.load_state_dict(state["model"])


# ======== 4. Algorithm 1: one optimisation step ==================================================
def train_step(model, ema, opt, diffusion, x0, y, step, hp, generator, part=None, forward=None,
               autocast=nullcontext(), cond=None):
    """Algorithm 1 once: the loss on the batch x0 (labels y or None), the lr's linear warm-up, the
    gradient's global norm clipped, Adam's step and the EMA update → (lr, loss, grad_norm), the last
    two tensors. hp: lr, warmup, grad_clip, p_uncond, micro_batch (None: all at once), loss and
    snr_gamma (optional). part: this process's rows under DDP; forward: model, compiled or under
    DDP; generator: t, ε, drops; cond: the batch's conditioning images, or None."""
    if forward is None:
        forward = model
    if part is None:
        part = slice(0, len(x0))
    lr = hp["lr"] * min(1.0, (step + 1) / max(1, hp["warmup"]))                  # linear warm-up
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    # Micro-batches: the part goes through the network M images at a time, and the gradients add
    # up to those of the whole part; each micro-batch draws the whole batch's t, ε and drops alike.
    first = part.start
    end = part.stop
    size = end - first
    M = hp["micro_batch"] or size
    state = generator.get_state()
    loss = 0.0
    for start in range(first, end, M):
        generator.set_state(state)
        if isinstance(forward, nn.parallel.DistributedDataParallel):
            forward.require_backward_grad_sync = start + M >= end  # all-reduce on the last one only
        with autocast:
            micro = slice(start, start + M)
            part_loss = diffusion.training_loss(forward, x0, y, hp["p_uncond"], generator, micro,
                                                hp["loss"], hp.get("snr_gamma", 0.0), cond)
            part_loss = part_loss * (M / size)
        part_loss.backward()
        loss = loss + part_loss.detach()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
    opt.step()
    ema.update(model)
    return lr, loss, grad_norm


if __name__ == "__main__":  # the commands are the tool's: ddpm_tool/cli.py
    import sys
    try:
        from ddpm_tool.cli import main
    except ImportError as e:  # ddpm.py copied alone: the method works, the commands need the tool
        if e.name != "ddpm_tool":
            raise
        print("ddpm.py: error: the commands are in the package ddpm_tool/, which comes with "
              "ddpm.py: put it beside ddpm.py", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
