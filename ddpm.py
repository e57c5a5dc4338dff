"""
ddpm.py: Denoising Diffusion Probabilistic Models in one file. The method first, the tool after.

    DDPM    Ho, Jain & Abbeel 2020, https://arxiv.org/abs/2006.11239  (Eq. and Algorithm numbers)
    DDIM    Song, Meng & Ermon 2020, https://arxiv.org/abs/2010.02502  (fewer sampling steps)
    DPM++   Lu et al. 2022, https://arxiv.org/abs/2211.01095  (DPM-Solver++: second order)
    CFG     Ho & Salimans 2022, https://arxiv.org/abs/2207.12598  (classifier-free guidance)
    cosine  Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672  (cosine noise schedule)

The method, top to bottom: schedule and math, samplers, U-Net, EMA, Algorithm 1's step. It needs
only torch and tqdm. Below the divider the tool runs it: `python ddpm.py --help` lists its commands.

Notation: T steps, 0-based in code: code t is the paper's t + 1 (t = 0: the last denoising step).
β_t is the noise variance of step t, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s. Data x_0 is in [-1, 1];
x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε, ε ~ N(0, I); the network predicts ε: ε̂ = ε_θ(x_t, t, y).
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
    LongTensor of 0-based steps; x: (B, C, H, W) in [-1, 1]; `model(x_t, t, y)` → ε̂ shaped as x."""
    def __init__(self, timesteps=1000, schedule="linear", variance="fixedlarge", device=None):
        self.num_timesteps = timesteps
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

    def predict_eps(self, model, x_t, t, y=None, guidance=1.0):
        """ε̂, guided if y is given and guidance s ≠ 1: ε̃ = ε_u + s (ε_c − ε_u), ε_u for the null
        label (index model.num_classes). s = 1: conditional, 0: unconditional (Ho & Salimans'
        w = s − 1)."""
        if y is None or guidance == 1.0:
            return model(x_t, t, y).float()
        null = torch.full_like(y, model.num_classes)
        # Both halves in one batched forward (as DiT's sample.py): one pass over the weights.
        eps = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null])).float()
        eps_c, eps_u = eps.chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    def predict_x0(self, model, x_t, t, y=None, guidance=1.0):
        """x̂_0 from the (guided) ε̂, clipped: what every sampler steps with."""
        eps = self.predict_eps(model, x_t, t, y, guidance)
        # Clip x̂_0, not x_t: data lies in [-1, 1], and an x̂_0 out of range pulls the mean off it.
        return self.predict_x0_from_eps(x_t, t, eps).clamp(-1, 1)

    def p_mean_variance(self, model, x_t, t, y=None, guidance=1.0):
        """Mean and variance of p_θ(x_{t−1} | x_t), and the clipped x̂_0 of the mean."""
        pred_x0 = self.predict_x0(model, x_t, t, y, guidance)
        mean, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)  # Eq. 11, written through x̂_0
        return mean, _extract(self.model_variance, t, x_t), pred_x0

    def training_loss(self, model, x0, y=None, p_uncond=0.0, generator=None, part=slice(None),
                      loss="l2"):
        """Algorithm 1's loss: t ~ U{0, …, T−1}, ε ~ N(0, I), ‖ε − ε_θ(x_t, t)‖², the pixel mean
        (Eq. 14; "l1": |ε − ε̂|; "huber": smooth L1, β = 1). A label becomes the null label with
        probability p_uncond: one network learns ε_c and guidance's ε_u. t, ε and the drops are
        drawn for the whole batch, the loss is over x0[part] (processes share the draws)."""
        batch = x0.shape[:1]
        t = torch.randint(0, self.num_timesteps, batch, generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        if y is not None and p_uncond > 0:
            drop = torch.rand(y.shape, generator=generator, device=y.device) < p_uncond
            y = torch.where(drop, torch.full_like(y, model.num_classes), y)
        y_part = None if y is None else y[part]
        eps = model(self.q_sample(x0[part], t[part], noise[part]), t[part], y_part)
        losses = {"l2": F.mse_loss, "l1": F.l1_loss, "huber": F.smooth_l1_loss}
        return losses[loss](eps.float(), noise[part])  # in fp32, also under autocast

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
               known=None, image=None, strength=1.0):
        """n images (n, C, H, W) in [-1, 1] from x_{T−1} = noise ~ N(0, I). sampler: "ancestral"
        (the default for steps=None: Algorithm 2 over all T steps), "ddim" (the default for steps=S:
        the S steps of sampling_steps(S, spacing)) or "dpm++" (DPM-Solver++(2M) over them). known:
        inpaint (paste_known). image, strength: SDEdit (Meng et al. 2021), from image noised by
        q(x_t | x_0) to t = strength · (T − 1); strength 0 returns the image."""
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
        return loops[sampler](model, x, ts, y, guidance, generator, callback, progress, known,
                              **options)

    def p_sample_loop(self, model, x, ts, y=None, guidance=1.0, generator=None, callback=None,
                      progress=False, known=None):
        """Algorithm 2: x_{t−1} = μ_θ(x_t, t) + σ_t z over all T steps (ts: every t)."""
        for i, t, again in _countdown(ts, x, progress, known):
            # z ~ N(0, I), and no noise at the last step
            z = torch.randn(x.shape, generator=generator, device=x.device) if i > 0 else 0
            mean, var, pred_x0 = self.p_mean_variance(model, x, t, y, guidance)
            x_prev = mean + var.sqrt() * z
            if callback is not None:
                callback(ts[i], x, pred_x0)
            x = self.paste_known(x_prev, ts, i, known, generator, again)
        return x

    def ddim_sample_loop(self, model, x, ts, y=None, guidance=1.0, generator=None, callback=None,
                         progress=False, known=None, eta=0.0):
        """DDIM (Song et al.) over the steps ts: eta 0 deterministic, 1 DDPM-like (σ²_t = β_t, the
        ancestral sampler's, is very bad with few steps: their Table 1)."""
        alphas_cumprod = self.alphas_cumprod.tolist()  # floats: no device syncs in the loop
        for i, t, again in _countdown(ts, x, progress, known):
            noisy = i > 0 and eta > 0
            z = torch.randn(x.shape, generator=generator, device=x.device) if noisy else 0
            pred_x0 = self.predict_x0(model, x, t, y, guidance)
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
                               callback=None, progress=False, known=None):
        """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) over ts: with α = sqrt(ᾱ), σ = sqrt(1 − ᾱ),
        λ = log(α/σ), each step solves the flow ODE for x̂_0 linear in λ through this and the last
        x̂_0. First order (DDIM, η = 0): the first step, and below 15 steps the one into t = 0."""
        alphas_cumprod = self.alphas_cumprod.tolist()
        last_x0 = None  # x̂_0 and h of the previous step
        h_last = None
        for i, t, again in _countdown(ts, x, progress, known):
            pred_x0 = self.predict_x0(model, x, t, y, guidance)
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
    """ε_θ(x, t, y) → ε̂ shaped as x (B, C, H, W); t: (B,) in 0..T−1; y: (B,) labels or None
    (label num_classes is the null label). The defaults are Ho et al.'s CIFAR-10 network, 35.7M
    parameters: 32→16→8→4 px at 128/256/256/256 channels, num_res_blocks blocks a level down and one
    more up (each takes a skip), attention at attn_resolutions and in the middle."""
    def __init__(self, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, image_size=32, num_classes=None,
                 same_padding=True, norm_eps=1e-6):
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
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
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

    def forward(self, x, t, y=None):
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
               autocast=nullcontext()):
    """Algorithm 1 once: the loss on the batch x0 (labels y or None), the lr's linear warm-up, the
    gradient's global norm clipped, Adam's step and the EMA update → (lr, loss, grad_norm), the last
    two tensors. hp: lr, warmup, grad_clip, p_uncond, micro_batch (None: all at once), loss. part:
    this process's rows under DDP; forward: model, compiled or under DDP; generator: t, ε, drops."""
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
                                                hp["loss"])
            part_loss = part_loss * (M / size)
        part_loss.backward()
        loss = loss + part_loss.detach()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), hp["grad_clip"])
    opt.step()
    ema.update(model)
    return lr, loss, grad_norm


# ======== The tool: run files, data, processes, sampling, the Trainer, the command line ========
# Everything below runs DDPM: none of it is needed to understand or reuse the method above.
import argparse, errno, glob, importlib, itertools, json, os, re, shutil, signal, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch.distributed as dist
from PIL import Image


# ======== 5. Run files: errors, atomic saves, the lock, checkpoints ===================================================
class UserError(Exception):
    """A problem the user can fix: reported as one line on stderr, exit code `code`, no traceback."""
    def __init__(self, message, code=2):
        super().__init__(message)
        self.code = code


def missing(error, what):
    """The line for an ImportError; the leaves beside ddpm.py are imported only where needed: ddpm.py alone trains."""
    name = (error.name or str(error)).split(".")[0]
    if name in ("fid", "nll", "pictures", "convert", "trackers"):
        return f"{what} needs {name}.py, which comes with ddpm.py: put it beside ddpm.py"
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
    → the open lock file (keep it), or None where the platform cannot lock (with a note)."""
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
        return None
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def load_checkpoint(path, mmap=False):
    """Load with weights_only=True (a crafted file cannot run code), or UserError; mmap: tensors read only when used.
    A folder or a hub id owner/name (whose owner is no local folder) is a diffusers model, read by convert.py."""
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not os.path.exists(path.split("/")[0])
    if os.path.isdir(path) or (hub_id and not path.endswith(".pt")):
        import convert
        return convert.load_diffusers(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))  # "Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y …"
        if found:  # a pickled Python object, maybe one that runs code when loaded: never unpickled
            raise UserError(f"{path}: refused, it holds a pickled Python object ({found[1]})") from None
        raise UserError(f"{path}: not a readable checkpoint, truncated or corrupt ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or not {"config", "classes", "ema", "step"} <= ckpt.keys():
        raise UserError(f"{path}: not a ddpm.py checkpoint")
    # Keys older runs lack, as they ran: among them the network's padding and GroupNorm ε before Ho et al.'s exact ones
    old = {"channels": 3, "flip": None, "eta": 0.0, "same_padding": False, "norm_eps": 1e-5, "variance": "fixedlarge"}
    ckpt["config"] = {**old, **ckpt["config"]}
    return ckpt


def unet_from_config(cfg, num_classes):
    return UNet(cfg["channels"], cfg["ch"], tuple(cfg["ch_mult"]), cfg["num_res_blocks"], tuple(cfg["attn_res"]),
                cfg["dropout"], cfg["image_size"], None if cfg["unconditional"] else num_classes,
                cfg["same_padding"], cfg["norm_eps"])


def export_model(path, out):
    """Checkpoint → a file to share, a quarter of its size: the EMA weights alone in fp16, config and class names."""
    ckpt = load_checkpoint(path)
    ema = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["ema"]["model"].items()}
    save_atomic(out, lambda f: torch.save(dict(config=dict(ckpt["config"], steps=ckpt["step"]), classes=ckpt["classes"],
                                               step=ckpt["step"], ema=dict(model=ema)), f), durable=True)


# ======== 6. Data: the whole training set decoded once into memory as uint8 ===========================================
def to_uint8(x):
    """[-1, 1] → uint8 pixels, quantised as a PNG of it stores them (torchvision's rounding): FID scores those."""
    return ((x.float() + 1) / 2).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def hw(size):  # an image size, S or (H, W) → (H, W)
    return (size, size) if isinstance(size, int) else tuple(size)


def resize_crop(image, size, nearest=False):
    """A PIL image, or images (…, h, w), resized to cover `size` (S or (H, W)) and centre-cropped to it: another
    aspect ratio loses its edges along the longer way, never stretched. S alone: the shorter side to S."""
    import torchvision.transforms.functional as TF
    H, W = hw(size)
    w, h = TF.get_image_size(image)
    cover = [H, int(w * H / h)] if H * w >= W * h else [int(h * W / w), W]  # the side that binds gets its size
    mode = TF.InterpolationMode.NEAREST if nearest else TF.InterpolationMode.BILINEAR
    return TF.center_crop(TF.resize(image, cover, mode, antialias=True), [H, W])


def random_subset(n, generator, flag="--n"):
    """A `pick` for load_images: a random n of the N images, drawn with generator (n None: all; n > N: UserError)."""
    if n is None:
        return None

    def pick(total):
        if n > total:
            raise UserError(f"{flag} {n}: the data has only {total} images")
        return torch.randperm(total, generator=generator)[:n]
    return pick


def to_image(x, nrow):
    """Images (B, C, H, W) in [-1, 1] → one PIL grid, grey ("L") for one channel, quantised as torchvision does."""
    from torchvision.utils import make_grid
    grid = make_grid(to_uint8(x), nrow=nrow, padding=1)[:x.shape[1]]  # make_grid makes grey RGB
    return Image.fromarray(grid.permute(1, 2, 0).squeeze(2).numpy())


def class_rows(num_classes, n):
    """Labels for a grid with one row per class, about n images in all → (labels, images per row)."""
    per = max(1, math.ceil(n / num_classes))
    return torch.arange(num_classes).repeat_interleave(per), per


def load_images(data, root="./data", image_size=32, workers=4, pick=None, flag="--data", cache=False,
                extensions=(".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif"), train=True):
    """→ (images uint8 (N, C, H, W), labels (N,), class names) of "cifar10", "mnist", "fashion-mnist" (downloaded into
    root; train: the training split, else the test split) or a folder data/<class>/*.png|jpg (or data/*.png), decoded
    now: a bad file is refused before training. C = 1 if all are grey, else 3; resize_crop to image_size, S or
    (H, W) (None: the first image's short side). pick(N) → the indices kept, before decoding. flag: what messages
    call `data`."""
    sets = {"cifar10": "CIFAR10", "mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
    if data in sets:
        return torchvision_images(data, sets[data], root, image_size, pick, train)
    if not os.path.isdir(data):
        raise UserError(f"{flag} {data}: no such folder (use {', '.join(sets)} or a folder <folder>/<class>/*.png)")
    def images_in(folder):
        return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.lower().endswith(extensions)]
    subfolders = [os.path.join(data, d) for d in sorted(os.listdir(data)) if not d.startswith(".")]
    by_class = {d: images_in(d) for d in subfolders if os.path.isdir(d)}
    by_class = {d: found for d, found in by_class.items() if found} or {data: images_in(data)}  # a cache: no class
    classes = [os.path.basename(os.path.normpath(d)) for d in by_class]
    files = [(f, i) for i, found in enumerate(by_class.values()) for f in found]
    if not files:
        raise UserError(f"{flag} {data}: no images ({', '.join(extensions)}) in {data}/<class>/ or {data}/")
    files = files if pick is None else [files[i] for i in pick(len(files))]
    if image_size is None:
        with Image.open(files[0][0]) as im:
            image_size = min(im.size)
    paths, labels = [f for f, _ in files], torch.tensor([y for _, y in files])
    if cache and pick is None:
        return cached_images(data, paths, image_size, workers), labels, classes
    return decode_images(paths, image_size, workers), labels, classes


def torchvision_images(data, name, root, image_size, pick=None, train=True):
    """load_images of torchvision's data set `name` (its training or test split), downloaded into root."""
    import torchvision
    made = not os.path.exists(root)
    try:
        ds = getattr(torchvision.datasets, name)(root, train=train, download=True)
    except Exception as e:  # no network, full disk: say so in one line, and leave no folder of ours behind
        if made:
            shutil.rmtree(root, ignore_errors=True)
        raise UserError(f"could not get {data} into {root} ({e}); pass a folder of its images instead")
    keep = slice(None) if pick is None else pick(len(ds.data))
    images = torch.as_tensor(ds.data)[keep]  # CIFAR-10: (N, 32, 32, 3); MNIST: (N, 28, 28), grey
    images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2).contiguous()
    if hw(image_size) != images.shape[-2:]:
        images = resize_crop(images, image_size)
    # Names to type after --class: "7 - seven" → "7", "T-shirt/top" → "t-shirt", "Ankle boot" → "ankle-boot"
    classes = [c.split(" - ")[0].split("/")[0].lower().replace(" ", "-") for c in ds.classes]
    return images, torch.as_tensor(ds.targets)[keep], classes


def decode_images(paths, image_size, workers=4):
    """Image files → uint8 (N, C, H, W), each resized to cover image_size and centre-cropped, decoded in threads
    (PIL releases the GIL); C = 1 if every image is grey, else 3, grey images repeated into R, G and B."""
    import torchvision.transforms.functional as TF

    def decode(path):
        try:
            with Image.open(path) as im:
                im = im.convert("L" if im.mode in ("1", "L", "LA", "I", "I;16") else "RGB")
                return TF.pil_to_tensor(resize_crop(im, image_size))
        except Exception as e:
            raise UserError(f"cannot read image {path} ({type(e).__name__}); fix or remove it")
    with ThreadPoolExecutor(workers) as pool:
        images = list(tqdm(pool.map(decode, paths), "loading", len(paths), leave=False, disable=None))
    channels = max(len(x) for x in images)
    return torch.stack([x.expand(channels, -1, -1) for x in images])


def cached_images(data, paths, image_size, workers=4):
    """decode_images of the folder data, kept in cache_dir("images")/images-<hash>.npy and mapped later. The hash
    covers the folder, each file's name, size and time and the image size: a changed folder is decoded anew. A damaged
    cache is decoded anew, one that cannot be written is skipped with a note: a cache is never a reason to stop."""
    import hashlib, numpy as np
    made_of = [(os.path.relpath(f, data), s.st_size, s.st_mtime_ns) for f, s in ((f, os.stat(f)) for f in paths)]
    key = hashlib.sha256(repr((os.path.abspath(data), image_size, made_of)).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir("images"), f"images-{key}.npy")
    try:  # mapped, not read: pages come from disk as batches touch them (copy-on-write, so torch may index it)
        images = torch.from_numpy(np.load(path, mmap_mode="c"))
        if images.shape[0] == len(paths) and images.shape[1] in (1, 3) and images.shape[2:] == hw(image_size):
            return images
    except Exception:  # none yet, or truncated or damaged: decoded anew
        pass
    images = decode_images(paths, image_size, workers)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_atomic(path, lambda f: np.save(f, images.numpy()))  # whole or not at all
    except Exception as e:
        print(f"note: the decoded images are not cached in {os.path.dirname(path)} "
              f"({getattr(e, 'strerror', None) or e}); they are decoded again next time", file=sys.stderr)
    return images


NATIVE_SIZE = {"cifar10": 32, "mnist": 28, "fashion-mnist": 28}  # torchvision's data sets, in pixels


def batch_indices(n, batch_size, seed, step):
    """Indices of the batch for `step`: epoch e is a permutation seeded by (seed, e), so the data order is a
    pure function of the step, and a resumed run sees exactly the batches the uninterrupted one would."""
    out, pos = [], step * batch_size
    while pos < (step + 1) * batch_size:  # a batch may straddle epochs (or span several for tiny datasets)
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))  # 50k: 0.4 ms
        out.append(perm[i:i + (step + 1) * batch_size - pos])
        pos += len(out[-1])
    return torch.cat(out)


# ======== 7. Devices, precision and processes =========================================================================
def get_device(name=None):
    """The named device, else the best one found: cuda, then mps, then cpu."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name is None:
        name = next(kind for kind, here in available.items() if here)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if not available.get(device.type, True):
        raise UserError(f"--device {name}: not available on this machine")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN time its algorithms once
    return device


def resolve_precision(precision, device, task, cpu=None):
    """--precision for `task` ("train", "sample", "nll") → "bf16" or "fp32": auto is bf16 on CUDA (fp16's speed, not its
    NaNs), and on a CPU to sample where ATen computes bf16 natively (AVX-512 with amx_bf16 or avx512_bf16: 2.0× as
    fast; training 1.1×; emulated: 7× slower). cpu: (capability, {flag: on})."""
    if precision != "auto":
        return precision
    if task == "nll":  # L_0 turns on ε̂ to within a bin of 2/255, finer than bf16's 8-bit mantissa resolves
        return "fp32"
    if device.type != "cpu":
        return "bf16" if device.type == "cuda" else "fp32"
    if cpu is None:
        flags = {"amx_bf16": torch.cpu._is_amx_tile_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported()}
        cpu = (torch.backends.cpu.get_cpu_capability(), flags)
    capability, flags = cpu
    native = capability.startswith("AVX512") and any(flags.get(f) for f in ("amx_bf16", "avx512_bf16"))
    return "bf16" if task == "sample" and native else "fp32"


def autocast(device, precision):
    """bf16 autocast for "bf16": the network's matrix work; schedule, loss, GroupNorm, x̂_0 and steps stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def init_processes(batch_size, device_name=None, micro_batch=None):
    """Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set): one of `world` DDP processes, one GPU each; rank 0 writes.
    → (device, rank, world, ctrl): ctrl, a gloo group for the stop flag (no GPU sync a step), None without torchrun."""
    ddp = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if batch_size % world or micro_batch and batch_size // world % micro_batch:
        parts = f" in micro-batches of {micro_batch}" if micro_batch else ""
        raise UserError(f"--batch-size {batch_size} (the global batch) does not split over {world} processes{parts}")
    device = get_device(device_name)
    if not ddp:
        return device, rank, world, None
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world, dist.new_group(backend="gloo")


# ======== 8. Sampling from a checkpoint: the sampler's flags, one batched loop, editing inputs, FID =================
def load_sampler(path, device):
    """Checkpoint → (EMA U-Net in eval mode on device, Diffusion, class names, config)."""
    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    model = unet_from_config(cfg, len(ckpt["classes"]))
    model.load_state_dict(ckpt["ema"]["model"])
    model.to(device, memory_format=torch.contiguous_format if device.type == "mps" else torch.channels_last).eval()
    return model, Diffusion(cfg["timesteps"], cfg["schedule"], cfg["variance"], device=device), ckpt["classes"], cfg


def find_checkpoint(ckpt):
    """--ckpt, else the newest runs/*/ckpt.pt, else the bundled model (with a note), or UserError."""
    path = ckpt or max(glob.glob(os.path.join("runs", "*", "ckpt.pt")), key=os.path.getmtime, default=None)
    if path is None:  # a fresh clone: the small CIFAR-10 model that ships in samples/
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "samples", "cifar10_small.pt")
        if not os.path.isfile(path):
            raise UserError("no checkpoint found in runs/*/ckpt.pt: train one first, or pass --ckpt")
        print(f"no runs/*/ckpt.pt: sampling from the bundled CIFAR-10 model {path}", file=sys.stderr)
    return path


SAMPLERS = {"ancestral": (None, "uniform"), "ddim": (25, "uniform"), "dpm++": (10, "quadratic")}  # steps, spacing


def sampler_options(args, device, cfg, T, deterministic=False, resample=1):
    """--sampler, --steps, --spacing, --eta, --guidance → Diffusion.sample's keywords (which refuses what it can't)."""
    defaults = [  # --sampler where it is not given: the first that holds
        (args.steps == 0, "ancestral"),  # --steps all
        (bool(args.steps), "ddim"),  # --steps N alone
        (deterministic, "dpm++"),  # interpolate: each sample a function of its noise
        (resample > 1, "ddim"),  # RePaint's resampling needs noise; measured with DDIM 25 steps, η = 1 (docs/)
        (device.type != "cpu", "ancestral"),  # a GPU: the paper's Algorithm 2
        (bool(cfg["eta"]), "ddim"),  # train --eta > 0: a deterministic solver leaves speckle on MNIST's digits
        (True, "dpm++")]  # a CPU, where 1000 steps take an hour: 10 steps as good as DDIM's 25 (docs/measurements.md)
    sampler = args.sampler or next(sampler for holds, sampler in defaults if holds)
    if args.steps is not None and args.steps > T:
        raise UserError(f"--steps {args.steps}: the model has only T = {T} steps")
    if deterministic and (sampler == "ancestral" or args.eta):
        raise UserError("interpolate needs a deterministic sampler: --sampler dpm++, or ddim with --eta 0")
    if args.eta and sampler != "ddim":
        raise UserError(f"--eta {args.eta}: only --sampler ddim takes it ({sampler} draws its own noise or none)")
    if args.spacing and sampler == "ancestral":
        raise UserError("--spacing: --sampler ancestral visits all T steps; use ddim or dpm++")
    steps, spacing = SAMPLERS[sampler]
    if args.steps is not None:
        steps = args.steps or None  # 0: all T steps
    elif steps:
        steps = min(steps, T)
    eta = 1.0 if resample > 1 else cfg["eta"]  # by default the model's own (train --eta); RePaint's: as measured
    if args.eta is not None or deterministic:
        eta = args.eta or 0.0
    return dict(guidance=args.guidance, steps=steps, eta=eta, sampler=sampler, spacing=args.spacing or spacing)


def load_run(args, task="sample", deterministic=False, resample=1):
    """What the commands that run a checkpoint share → a Namespace: device, path, the EMA U-Net (model), its Diffusion,
    classes and config, shape (C, H, W) of its images, precision; to sample, the sampler's options too."""
    device = get_device(args.device)
    path = find_checkpoint(args.ckpt)
    model, diffusion, classes, cfg = load_sampler(path, device)
    shape = (cfg["channels"], *hw(cfg["image_size"]))
    run = argparse.Namespace(device=device, path=path, model=model, diffusion=diffusion, classes=classes, cfg=cfg,
                             shape=shape, precision=resolve_precision(args.precision, device, task))
    if task == "sample":
        run.options = sampler_options(args, device, cfg, diffusion.num_timesteps, deterministic, resample)
        # CPU: batches of 16 keep tensors under glibc's 32 MB mmap threshold, so memory is reused, not faulted in anew
        run.batch_size = args.batch_size or (1024 if device.type == "cuda" else 16)  # (64 ships, 2 cores: 45 → 34 s)
        run.compile = args.compile
    return run


def labels_from_args(args, run, n, rows):
    """The labels of n samples → (labels or None, images a row, the name for the output): --class, else the classes
    in turn (rows: whole rows of a grid, n rounded up; else exactly n), or None for an unconditional model."""
    c = getattr(args, "class")
    classes = run.classes
    nrow = math.ceil(math.sqrt(n))
    if c is not None and run.cfg["unconditional"]:
        raise UserError(f"--class: {run.path} is an unconditional model")
    if run.cfg["unconditional"]:
        return None, nrow, "all"
    if c is None:
        labels, per = class_rows(len(classes), n)
        return labels if rows else labels[:n], per, "all"
    index = {str(i): i for i in range(len(classes))} | {name: i for i, name in enumerate(classes)}  # names first
    if c not in index:
        raise UserError(f"--class {c}: unknown; choose from {', '.join(classes)} (or 0-{len(classes) - 1})")
    return torch.full((n,), index[c]), nrow, classes[index[c]]


def _rows(value, rows, device):
    """value[rows] on device for a tensor (also inside a tuple: inpainting's known), else value itself."""
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, device) for v in value)
    if isinstance(value, torch.Tensor):
        return value[rows].to(device)
    return value


def sample_batches(model, diffusion, n, batch_size, pad=False, progress=False, **kwargs):
    """Yields n samples of Diffusion.sample(model, …, **kwargs) in batches on the CPU; a tensor of n rows among kwargs
    (y, noise, image, known's) is sliced along. pad: a last batch drawn whole and cut, for a compiled model."""
    device = next(model.parameters()).device
    spoilt = 0
    for start in tqdm(range(0, n, batch_size), "batches", leave=False, disable=True if n <= batch_size else None):
        size = batch_size if pad else min(batch_size, n - start)
        batch = {name: _rows(value, torch.arange(start, start + size) % n, device) for name, value in kwargs.items()}
        try:
            x = diffusion.sample(model, size, progress=progress, **batch)
        except ValueError as e:  # its refusals: a sampler and steps that do not go together
            raise UserError(str(e)) from None
        x = x[:n - start].float().cpu()
        spoilt += int((~x.isfinite()).flatten(1).any(1).sum())
        yield x
    if spoilt:  # a NaN quantises to black: say so rather than leave black images unexplained
        print(f"note: {spoilt} of {n} samples hold NaN or inf (black in a PNG): the model's weights are not finite, or "
              "bf16 overflowed (try --precision fp32)", file=sys.stderr)


def draw(run, n, **per_image):
    """sample_batches of run's model with run's sampler: n samples, compiled for long runs (or as --compile says)."""
    compiled = run.compile
    if compiled is None:  # compiling takes ~30 s on an H100: for long runs only
        steps = run.options["steps"] or run.diffusion.num_timesteps
        compiled = run.device.type == "cuda" and n * steps >= 200_000
    model = torch.compile(run.model) if compiled else run.model
    return sample_batches(model, run.diffusion, n, run.batch_size, compiled, n <= run.batch_size, **run.options,
                          **per_image)


def describe(run):
    """The sampler in words, as the sampling commands report it."""
    options = run.options
    steps = options["steps"] or run.diffusion.num_timesteps
    spacing = "" if options["spacing"] == "uniform" else f" ({options['spacing']})"
    words = {"ancestral": f"ancestral {steps} steps", "dpm++": f"DPM-Solver++(2M) {steps} steps{spacing}",
             "ddim": f"DDIM {steps} steps{spacing}, eta {options['eta']}"}
    return words[options["sampler"]]


def sample_out(out, default):
    """--out, by default outputs/<default> (not samples/) → (the path, whether a folder for a PNG each), writable."""
    out = out or os.path.join("outputs", default)
    per_file = out.endswith(("/", os.sep)) or os.path.isdir(out)
    ensure_writable(out if per_file else os.path.dirname(out) or ".", "--out")
    return out, per_file


def write_run(args, run, default, batches, picture, what):
    """How every sampling command ends: the samples of `batches`, drawn from --seed, into --out (sample_out): a PNG each
    in a folder/, written while sampling goes on, or picture(all of them), a PIL image, in one file; then its line."""
    out, per_file = sample_out(args.out, default)
    torch.manual_seed(args.seed)
    with autocast(run.device, run.precision):
        if per_file:
            images = (image for batch in batches for image in batch)
            with ThreadPoolExecutor(8) as pool:  # map takes each sample as it comes; its threads write <i>.png
                written = pool.map(lambda i, x: save_atomic(f"{out}/{i:06d}.png", to_image(x[None], 1).save),
                                   itertools.count(), images)
                count = len(list(written))
        else:
            x = torch.cat(list(batches))
            save_atomic(out, picture(x).save)
            count = len(x)
    print(f"wrote {count} {what} ({describe(run)}, guidance {run.options['guidance']}, {run.precision}) from "
          f"{run.path} to {out}", file=sys.stderr)
    return 0


def reverse_process(model, diffusion, n, frames=10, **kwargs):
    """Sample n images in one batch → (images, [(t, x_t, x̂_0)] at `frames` steps evenly spaced over the sampler's,
    from its first (t = T − 1, x_t the start noise) to its last (t = 0, x̂_0 the images)), all on the CPU."""
    ts = diffusion.sampling_steps(kwargs.get("steps"), kwargs.get("spacing", "uniform"))[::-1]  # as it visits them
    keep = {ts[j] for j in torch.linspace(0, len(ts) - 1, min(frames, len(ts))).round().long().tolist()}
    kept = []

    def record(t, x_t, x0):
        if t in keep:
            kept.append((t, x_t.float().cpu(), x0.float().cpu()))
    return diffusion.sample(model, n, callback=record, **kwargs).float().cpu(), kept


def forward_process(x0, noise, diffusions, columns=10):
    """x_t ~ q(x_t | x_0) (Eq. 4) of images x0 (N, C, H, W) at `columns` evenly spaced t from 0 to T − 1 → (rows:
    for each image one row for each of the Diffusions, one ε = noise[i] along them; the t of the columns)."""
    ts = torch.tensor(diffusions[0].sampling_steps(columns))  # the t a `columns`-step DDIM sampler visits
    rows = [list(d.q_sample(x.expand(columns, *x.shape), ts, eps.expand(columns, *eps.shape)))
            for x, eps in zip(x0, noise) for d in diffusions]
    return rows, ts.tolist()


def edit_inputs(args, run):
    """IMAGE|FOLDER of inpaint and img2img at the model's size, in [-1, 1]: the image, or a random --n of the folder's
    → (images (k, C, H, W), the labels of the --n results or None, the index of each result's image, in turn). Labels:
    --class, else each image's own if its folder is named as a class of the model's (CIFAR-10's test set), else none."""
    cfg = run.cfg
    labels = None
    if os.path.isfile(args.input):
        images = decode_images([args.input], cfg["image_size"], 1)
    elif os.path.isdir(args.input):
        pick = random_subset(args.n, torch.Generator().manual_seed(args.seed))
        images, folder_labels, names = load_images(args.input, image_size=cfg["image_size"], pick=pick,
                                                   flag=args.command)
        if set(names) <= set(run.classes) and not cfg["unconditional"]:
            labels = torch.tensor([run.classes.index(names[c]) for c in folder_labels.tolist()])
    else:
        raise UserError(f"{args.command} {args.input}: no such file or folder")
    kinds = {1: "grey", 3: "colour"}
    if images.shape[1] != cfg["channels"]:
        raise UserError(f"{args.command} {args.input}: {kinds[images.shape[1]]} images; the model makes "
                        f"{kinds[cfg['channels']]} ones")
    if getattr(args, "class") is not None:
        labels = labels_from_args(args, run, len(images), rows=False)[0]
    index = torch.arange(args.n) % len(images)
    return images.float() / 127.5 - 1, None if labels is None else labels[index], index


def load_mask(path, size, image=None):
    """--mask: a PNG, white where the model paints, of the model's size, or of inpaint's image (then resized and
    cropped as it is) → (1, 1, H, W): 1 where a pixel is known. None: the centre, half of each side."""
    import torchvision.transforms.functional as TF
    H, W = hw(size)
    known = torch.ones(1, 1, H, W)
    if path is None:
        known[..., H // 4:H // 4 + H // 2, W // 4:W // 4 + W // 2] = 0
        return known
    try:
        with Image.open(path) as im:
            mask = im.convert("L")
    except Exception as e:
        raise UserError(f"--mask {path}: cannot read it as an image ({type(e).__name__})") from None
    sizes = [(W, H)]  # PIL's (width, height)
    if image is not None and os.path.isfile(image):
        with Image.open(image) as im:
            sizes.append(im.size)
    if mask.size not in sizes:
        wanted = " or ".join(f"{w}×{h}" for w, h in sizes)
        raise UserError(f"--mask {path}: {mask.size[0]}×{mask.size[1]} pixels; it must be {wanted} (width × height)")
    return (TF.pil_to_tensor(resize_crop(mask, size, nearest=True))[None] < 128).float()


def fid_reference(fid, net, ref, root="./data", image_size=32, n=None, workers=4, channels=None):
    """fid.reference_stats of --ref: an .npz with mu and sigma, or cifar10, mnist, an image folder decoded as training
    decodes it at image_size (all its images or a fixed random n), their statistics cached in cache_dir("fid")."""
    def decode(ref):
        pick = random_subset(n, torch.Generator().manual_seed(0), "--ref-n")
        return load_images(ref, root, image_size, workers, pick, flag="--ref")[0]
    return fid.reference_stats(net, ref, decode, cache_dir("fid"), channels)


def inception(path, device):
    """fid.py and its Inception network: weights from --inception, else $DDPM_INCEPTION, else downloaded once."""
    import fid
    try:
        return fid, fid.load_inception(path or os.environ.get("DDPM_INCEPTION"), device)
    except fid.FIDError as e:
        raise fid.FIDError(f"{e}; offline, pass --inception PATH to a local copy (or set DDPM_INCEPTION)") from None


# ======== 9. The Trainer: batches, DDP and the bookkeeping around train_step ==========================================
PRESETS = {"paper": {}, "small": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(), dropout=0.0, lr=1e-3,
                                      batch_size=32, warmup=200, steps=1150, ema_decay=0.999, eta=1.0, log_every=50)}
# The network for larger images without --ch-mult: at 256 px Ho et al.'s LSUN and CelebA-HQ one (114M parameters;
# App. B, run_celebahq.py); at 64 and 128 px guided-diffusion's multipliers, attention at 16 and 8 px (improved DDPM).
NET_BY_SIZE = {64: dict(ch_mult=(1, 2, 3, 4), attn_res=(16, 8)), 128: dict(ch_mult=(1, 1, 2, 3, 4), attn_res=(16, 8)),
               256: dict(ch_mult=(1, 1, 2, 2, 4, 4), attn_res=(16,), lr=2e-5, batch_size=64, dropout=0.0)}
INIT_KEYS = ("ch", "ch_mult", "num_res_blocks", "attn_res", "timesteps", "schedule", "unconditional", "same_padding",
             "norm_eps")  # --init's network
# What a resumed run may change; everything else must match the checkpoint, or the run would silently differ.
RESUMABLE = {"steps", "save_every", "keep_every", "sample_every", "log_every", "device", "num_workers", "eta",
             "precision", "compile", "data", "data_root", "out", "fid_every", "fid_n", "fid_ref", "inception",
             "micro_batch", "report_to", "grad_checkpoint"}
TRACKERS = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}  # --report-to: the module each needs


class Trainer:
    """One run: __init__ builds its state (data, U-Net, EMA, Adam, the two random streams), new or resumed; train_step
    is Algorithm 1 once; periodic the bookkeeping after it; on_signal and agreed_signal stop it; run is the loop."""
    def __init__(self, cfg, ckpt=None, device=torch.device("cpu"), rank=0, world=1, ctrl=None):
        self.device = device
        self.rank = rank
        self.world = world
        self.ctrl = ctrl
        self.ddp = ctrl is not None
        torch.manual_seed(cfg["seed"])  # the weights' initialisation
        images, labels, self.classes = self.load_data(cfg, ckpt)
        cfg = dict(cfg, channels=images.shape[1])  # the data decides: 1 (grey) or 3, saved with the config
        self.cfg = cfg
        self.model = self.build_model(ckpt)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.ema = EMA(self.model, cfg["ema_decay"])
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg["lr"], fused=device.type == "cuda")
        self.diffusion = Diffusion(cfg["timesteps"], cfg["schedule"], device=device)
        # Two random streams: `data` draws t, ε, flips and label drops for the whole global batch (the same in every
        # process), the global one dropout (its own in each process). Both are saved, so a resumed run is exact.
        self.data = torch.Generator(device).manual_seed(cfg["seed"])
        self.step = 0
        torch.manual_seed(cfg["seed"] * 1_000_003 + 7919 * (rank + 1))
        if ckpt is not None:
            self.resume(ckpt)
        self.out = cfg["out"]
        B = cfg["batch_size"]
        self.part = slice(rank * B // world, (rank + 1) * B // world)  # this process's share of every batch
        if not rank:
            for stale in glob.glob(os.path.join(self.out, "*.tmp[0-9]*")):  # left by a kill mid-save
                os.remove(stale)
        self.images = self.place(images)
        self.labels = labels.to(device)
        self.forward = self.wrap(self.model)
        self.amp = autocast(device, resolve_precision(cfg["precision"], device, "train"))
        self.pending = []  # (loss, grad norm) per step: on the device until check(), then as floats in stats
        self.stats = []
        self.postfix = {}
        self.signals = []
        self.pictures = None  # pictures.py: imported at the first log line
        self.saved = None if ckpt is None else ckpt["step"]  # the step of the last save

    def say(self, line):  # on stderr, in rank 0 only
        if not self.rank:
            print(line, file=sys.stderr)

    def build_model(self, ckpt):
        """The U-Net on the device, NHWC (tensor cores' layout, oneDNN's on a CPU); --init's weights for a new run."""
        cfg = self.cfg
        self.fmt = torch.contiguous_format if self.device.type == "mps" else torch.channels_last
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
        self.compiled = cuda if self.cfg["compile"] is None else self.cfg["compile"]
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
            forward = nn.parallel.DistributedDataParallel(forward, device_ids=[self.device.index] if cuda else None)
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
        self.step, rng = ckpt["step"], ckpt["rng"]
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
        lr, loss, grad_norm = train_step(self.model, self.ema, self.opt, self.diffusion, x0, y, self.step, cfg,
                                         self.data, self.part, self.forward, self.amp)
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
        self.t_log, self.step_log = time.time(), self.step

    def draw_progress(self):
        """progress.png: the loss (and FID) against the step, from log.txt; without pictures.py, a note, and on."""
        if self.pictures is None:
            try:
                import pictures
                self.pictures = pictures
            except ImportError as e:
                self.pictures = False
                print(f"note: no progress.png: {missing(e, 'progress.png')}", file=sys.stderr)
        if self.pictures:
            fig = self.pictures.progress_chart(self.log.name)
            save_atomic(os.path.join(self.out, "progress.png"), lambda f: fig.savefig(f, format="png"))

    def report(self, line, **values):
        """A line into log.txt (after the step), and the values (numbers, PIL images) to --report-to's trackers."""
        if line:
            print(f"step {self.step} {line}", file=self.log, flush=True)
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
        g = torch.Generator(self.device).manual_seed(cfg["seed"])
        return sample_batches(self.ema.model, self.diffusion, n, batch_size, y=y, guidance=2.0,
                              steps=min(100, cfg["timesteps"]), eta=cfg["eta"], generator=g)

    def preview(self):  # a grid of EMA samples in the run folder, a row per class
        labels, nrow = (None, 8) if self.cfg["unconditional"] else class_rows(len(self.classes), 64)
        n = 64 if labels is None else len(labels)
        with self.amp:
            image = to_image(torch.cat(list(self.ema_samples(n, n))), nrow)
        save_atomic(os.path.join(self.out, f"samples_{self.step:08d}.png"), image.save)
        self.report(None, samples=image)
        self.t_log, self.step_log = time.time(), self.step  # images/s counts training only

    def setup_fid(self):
        """Inception and the statistics of the training images or of --fid-ref, before the first step (cached)."""
        cfg = self.cfg
        self.fid, self.inception = inception(cfg["inception"], self.device)
        if cfg["fid_ref"] is None:
            self.fid_ref = self.fid.cached_stats(self.inception, self.images, cache_dir("fid"))
        else:
            self.fid_ref = fid_reference(self.fid, self.inception, cfg["fid_ref"], cfg["data_root"], cfg["image_size"],
                                         None, cfg["num_workers"], cfg["channels"])

    def measure_fid(self):
        """FID of fid_n EMA samples against the reference, into log.txt and the progress bar."""
        cfg = self.cfg
        n = cfg["fid_n"]
        with self.amp:  # Inception itself runs in fp32 (inception_stats)
            stats = self.fid.inception_stats(self.inception, map(to_uint8, self.ema_samples(n, cfg["batch_size"])))
        score = self.fid.frechet_distance(*stats[:2], *self.fid_ref[:2])
        self.postfix["fid"] = f"{score:.2f}"
        self.bar.set_postfix(self.postfix)
        self.report(f"fid {score:.4f} n {n} DDIM {min(100, cfg['timesteps'])} steps, eta {cfg['eta']}, guidance 2.0",
                    fid=score)
        self.t_log, self.step_log = time.time(), self.step

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

    def run(self):
        """Train to cfg["steps"] → 0, or after a signal save and → 128 + its number."""
        cfg = self.cfg
        out = self.out
        if self.params > 20e6 and self.device.type == "cpu":
            self.say(f"note: this {self.params / 1e6:.1f}M-parameter U-Net is sized for a GPU (2 CPU cores train it at "
                     "~3.3 images/s); --preset small learns digits (--data mnist) on a CPU in 3-10 minutes")
        processes = f"{self.world} processes" if self.world > 1 else "1 process"
        self.say(f"training {self.params / 1e6:.2f}M-parameter U-Net on {len(self.images)} images "
                 f"({len(self.classes)} classes) on {self.device} in {processes}, step "
                 f"{self.step} → {cfg['steps']}, run folder {out}")
        signum, log = 0, os.path.join(out, "log.txt") if not self.rank else os.devnull
        if cfg["fid_every"] and not self.rank:
            self.setup_fid()
        self.trackers = None  # trackers.py, imported only for --report-to; rank 0 alone reports
        if cfg["report_to"] and not self.rank:
            import trackers
            self.trackers = trackers.Trackers(cfg, self.step)
        handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with open(log, "a") as self.log, tqdm(total=cfg["steps"], initial=self.step, dynamic_ncols=True,
                                                  disable=True if self.rank else None) as self.bar:
                self.t_log, self.step_log = time.time(), self.step
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
            if self.trackers:
                self.trackers.close()
        if signum:
            self.say(f"interrupted at step {self.step}; saved {out}/ckpt.pt. Resume with: "
                     f"{'torchrun … ' if self.ddp else 'python '}ddpm.py train --resume --out {out}")
            return 128 + signum
        self.say(f"done: {out}/ckpt.pt at step {self.step}")
        return 0




# ======== 10. Command line: each command's flags beside its handler, in the README's order ==========================
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + line
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _num(kind, lo, hi, lo_open=False):
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


def _numbers(kind, lo, hi):
    """argparse type: comma-separated numbers, each in [lo, hi]: "1,2,2" → (1, 2, 2); "" → ()."""
    def parse(text):
        return tuple(_num(kind, lo, hi)(v) for v in text.split(",") if v.strip())
    return parse


def _size(text):  # "32" → 32; "16,32" → (16, 32): height, width
    sides = _numbers(int, 4, 4096)(text)
    if len(sides) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r}: a side, or height,width")
    return sides[0] if len(set(sides)) == 1 else sides


def _steps(text):  # "all" → 0 (every step), else a whole number of steps
    return 0 if text == "all" else _num(int, 1, 10 ** 5)(text)


def _trackers(text):  # "tensorboard,wandb" → ("tensorboard", "wandb"); "none" → ()
    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip() not in ("", "none")))
    if set(names) - set(TRACKERS):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(TRACKERS)} (comma-separated) or none")
    return names


def _add_options(parser, rows, given_only=False):
    """rows of (flag, kind, default, help): kind a type, a tuple of choices, "switch" or "on/off" (--x and --no-x);
    default ...: required. given_only (train): None where not given, so that a resumed run keeps its own."""
    for flag, kind, value, text in rows:
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
SEED = ("--seed", _num(int, 0, 2 ** 62), 0, "random seed")
RUN = [  # every command that runs the network
    ("--device", str, None, "cuda, cuda:N, mps or cpu (default: the best found)"),
    ("--precision", ("auto", "fp32", "bf16"), "auto", "auto: bf16 autocast on CUDA, and to sample on a CPU that "
     "computes bf16 natively (AMX, AVX512-BF16); fp32 to train on a CPU and for nll (L_0 needs more than bf16)"), SEED,
    ("--batch-size", _num(int, 1, 65536), None, "images a training step (train: 128), or a batch (to sample: 1,024 on "
     "CUDA, else 16; nll's (image, t) pairs: 1,024 or 64)")]
CKPT = ("--ckpt", str, None, "checkpoint, export or diffusers model (default: newest runs/*/ckpt.pt, else bundled)")
COMPILE = ("--compile", "on/off", None, "torch.compile (default: on CUDA to train, and where samples × steps ≥ 2e5)")
SAMPLER = [CKPT, COMPILE,  # every command that samples
           ("--class", str, None, "class name or index (default: every class in turn; to edit, an image's own where "
            "its folder is named as one of the model's, else none)"),
           ("--guidance", _num(float, 0, 100), 2.0, "guidance s: 1 = conditional, 0 = unconditional"),
           ("--steps", _steps, None, "the sampler's steps, or all T (alone: N samples with DDIM, all ancestrally)"),
           ("--eta", _num(float, 0, 1), None, "DDIM noise: 0 deterministic, 1 DDPM-like (default: the model's)"),
           ("--sampler", tuple(SAMPLERS), None, "ancestral (Algorithm 2), DDIM, or DPM-Solver++(2M) (default: "
            "ancestral on a GPU; on a CPU dpm++, 10 steps, or ddim, 25, for a model of train --eta > 0)"),
           ("--spacing", ("uniform", "quadratic", "logsnr"), None, "the steps' spacing: uniform or quadratic in t, "
            "uniform in log-SNR (default: dpm++ quadratic, ddim uniform)")]
OUT = ("--out", str, None, "a PNG, or a folder/ for a PNG each (default: outputs/<class or command>.png)")
INPUT = ("input", "IMAGE|FOLDER", ..., "an image, or a folder of images (<folder>/<class>/*.png|jpg, or *.png|jpg)")
DATA_ROOT = ("--data-root", str, "./data", "where cifar10, mnist and fashion-mnist are downloaded (decoded images and "
             "FID statistics are cached in $DDPM_CACHE, by default ~/.cache/ddpm: set it to move them)")
WORKERS = ("--num-workers", _num(int, 1, 256), 4, "decoding threads")
INCEPTION = ("--inception", str, None, "Inception's weights, for offline use (default: $DDPM_INCEPTION, else fetched)")
JSON = ("--json", "switch", None, "print the result as one JSON object")


BIG = 10 ** 9
TRAIN = RUN + [DATA_ROOT, WORKERS, INCEPTION, COMPILE] + [  # and their defaults: Ho et al.'s CIFAR-10 run
    ("--data", str, "cifar10", "cifar10, mnist, fashion-mnist, or an image folder <folder>/<class>/*.png|jpg"),
    ("--image-size", _size, None, "side in pixels, or height,width (default: the data's own if the U-Net can, else "
     "32): images are resized to cover it and centre-cropped, never stretched"),
    ("--out", str, None, "run folder: ckpt.pt, log.txt, progress.png, samples_*.png (default: runs/<data name>)"),
    ("--steps", _num(int, 1, BIG), 800_000, "training steps"), ("--warmup", _num(int, 0, BIG), 5000, "warm-up steps"),
    ("--lr", _num(float, 0, 1, True), 2e-4, "Adam's learning rate"),
    ("--grad-clip", _num(float, 0, 1e6, True), 1.0, "the gradient's norm is clipped to this"),
    ("--ch", _num(int, 8, 4096), 128, "base channels"), ("--num-res-blocks", _num(int, 1, 64), 2, "blocks a level"),
    ("--ch-mult", _numbers(int, 1, 4096), (1, 2, 2, 2), "channels per level, e.g. 1,2,2"),
    ("--attn-res", _numbers(int, 1, 4096), (16,), "resolutions with self-attention, e.g. 16 or 16,8 ('' for none); "
     "a map counts by its shorter side, so H×W gets attention where a square image of side min(H, W) would"),
    ("--dropout", _num(float, 0, 0.99), 0.1, "dropout"), ("--ema-decay", _num(float, 0, 1), 0.9999, "EMA decay"),
    ("--timesteps", _num(int, 2, 100_000), 1000, "diffusion steps T"),
    ("--schedule", ("linear", "cosine"), "linear", "noise schedule"),
    ("--p-uncond", _num(float, 0, 1), 0.1, "probability of the null label in training (for guidance)"),
    ("--eta", _num(float, 0, 1), 0.0, "DDIM noise for this model's samples (previews, `sample`'s default); 1 cleans "
     "up an undertrained model's samples"),
    ("--save-every", _num(int, 1, BIG), 5000, "save interval"), ("--log-every", _num(int, 1, BIG), 100, "log interval"),
    ("--keep-every", _num(int, 0, BIG), 0, "also keep ckpt_<step>.pt every N steps (0: only the last)"),
    ("--sample-every", _num(int, 0, BIG), 10000, "EMA sample grid interval (0: never)"),
    ("--fid-every", _num(int, 0, BIG), 0, "FID of the EMA model into log.txt every N steps (0: never)"),
    ("--fid-n", _num(int, 2, 10 ** 6), 1000, "samples for that FID (DDIM as the previews)"),
    ("--fid-ref", str, None, "FID reference as `fid --ref` takes it (default: the training images)"),
    ("--micro-batch", _num(int, 1, 65536), None, "images through the network at a time, gradients accumulated "
     "over the batch: less memory, the same step (default: the whole batch)"),
    ("--grad-checkpoint", "switch", False, "activation checkpointing: each residual block keeps only its input and is "
     "redone in the backward pass: less memory, the same step, one more forward pass of time"),
    ("--init", str, None, "fine-tune: start from this checkpoint's or exported model's EMA weights and network, with "
     "a new optimizer, step and random streams"),
    ("--loss", ("l2", "l1", "huber"), "l2", "the loss on ε̂: l2 (Ho et al.'s Eq. 14), l1, huber (smooth L1, β = 1)"),
    ("--report-to", _trackers, (), "also log to tensorboard (<out>/tensorboard/), wandb ($WANDB_PROJECT, "
     "WANDB_MODE=offline), or both: tensorboard,wandb"),
    ("--flip", "on/off", None, "random horizontal flips (default: on, but off for --data mnist: turn them off for "
     "any digits, letters or text)"), ("--unconditional", "switch", False, "ignore the classes")]
# Every key of a run's config: the flags' defaults, and what is not a flag: Ho et al.'s exact network and σ²_t
TRAIN_DEFAULTS = dict({row[0][2:].replace("-", "_"): row[2] for row in TRAIN}, batch_size=128, same_padding=True,
                      norm_eps=1e-6, variance="fixedlarge")


def new_config(preset, given):
    """A new run's config: the flags given, over the preset, over Ho et al.'s defaults; --init's network."""
    cfg = {**TRAIN_DEFAULTS, **PRESETS[preset], **given}
    if cfg["init"]:  # fine-tuning: the network and schedule are --init's, and its image size unless given
        init = load_checkpoint(cfg["init"], mmap=True)["config"]  # the weights are read once, by the Trainer
        for key in INIT_KEYS:
            if key in given and given[key] != init[key]:
                raise UserError(f"--{key.replace('_', '-')} {given[key]}: the network comes from --init "
                                f"{cfg['init']}, which has {init[key]}")
        cfg.update({k: init[k] for k in INIT_KEYS}, image_size=cfg["image_size"] or init["image_size"])
    native = NATIVE_SIZE.get(cfg["data"], 32)  # the data's own size if the U-Net can halve it enough, else 32
    cfg["image_size"] = cfg["image_size"] or (32 if native % 2 ** (len(cfg["ch_mult"]) - 1) else native)
    if preset == "paper" and not cfg["init"] and "ch_mult" not in given:  # a network sized for the images
        cfg.update({k: v for k, v in NET_BY_SIZE.get(max(hw(cfg["image_size"])), {}).items() if k not in given})
    factor = 2 ** (len(cfg["ch_mult"]) - 1)  # now, not once the data is decoded
    sides = hw(cfg["image_size"])
    if any(side % factor for side in sides):
        near = [" or ".join(map(str, sorted({max(factor, s - s % factor), s + -s % factor}))) for s in sides]
        raise UserError(f"--image-size {','.join(map(str, dict.fromkeys(sides)))}: a U-Net of {len(cfg['ch_mult'])} "
                        f"levels halves it {len(cfg['ch_mult']) - 1} times, so each side must be a multiple of "
                        f"{factor}; the nearest: {' by '.join(near)}")
    return cfg


TRAIN_ONLY = [("--preset", tuple(PRESETS), "paper", "paper: Ho et al.'s setup (the defaults shown); small: "
               + ", ".join(f"{k} {v}" for k, v in PRESETS["small"].items()) + "; flags override"),
              ("--resume", "switch", None, "continue the run in --out exactly where it stopped")]


def cmd_train(args):
    """train a model (default: Ho et al.'s CIFAR-10 setup)"""
    given = {k: v for k, v in vars(args).items() if k in TRAIN_DEFAULTS and v is not None}
    name = os.path.basename(os.path.normpath(given.get("data", "cifar10")))
    out = given.setdefault("out", os.path.join("runs", name))
    first = not int(os.environ.get("RANK", 0))  # rank 0 holds the run folder
    lock = hold(out) if first and os.path.isdir(out) else None  # before anything reads it
    try:
        cfg, ckpt = train_config(args, given, out)
        device, rank, world, ctrl = init_processes(cfg["batch_size"], cfg["device"], cfg["micro_batch"])
        trainer = Trainer(cfg, ckpt, device, rank, world, ctrl)
        if first and lock is None:  # a new run's folder, made only now: a run that cannot start leaves none
            lock = hold(out)
        return trainer.run()  # → 0, or 128 + the signal that stopped it
    finally:
        if lock:
            lock.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def train_config(args, given, out):
    """The run's config and checkpoint (None for a new run): new from the flags given (over the preset and Ho et al.'s
    defaults), or resumed from out/ckpt.pt, whose flags may change only where RESUMABLE."""
    path = os.path.join(out, "ckpt.pt")
    ckpt = None
    if args.resume:
        if not os.path.exists(path):
            raise UserError(f"--resume: no checkpoint in {out}/ to resume (start without --resume)")
        ckpt = load_checkpoint(path)
        if "optimizer" not in ckpt:  # export_model's file: EMA weights alone
            raise UserError(f"{path} is an exported model (EMA weights only: no optimizer, no random states): it "
                            f"cannot resume a run; fine-tune from it with train --init {path} --out NEW_FOLDER")
        cfg = {**TRAIN_DEFAULTS, **ckpt["config"]}  # flags added since that run began: off, as it ran
    elif os.path.exists(path):
        raise UserError(f"{path} exists: pass --resume to continue that run, or choose another --out")
    else:
        cfg = new_config(args.preset or "paper", given)
    cfg["flip"] = cfg["data"] != "mnist" if cfg["flip"] is None else cfg["flip"]  # a mirrored 7 is no 7
    for key, value in given.items():  # a new run holds `given` already; a resumed one may change RESUMABLE only
        if key not in RESUMABLE and value != cfg[key]:
            raise UserError(f"--{key.replace('_', '-')} {value}: the run in {out} used {cfg[key]}; "
                            f"drop the flag to resume it, or train into another --out")
    cfg.update(given)
    if cfg["fid_every"]:  # now, not at the first FID hours in
        import fid  # noqa: F401
    if cfg["report_to"]:  # and before any data is decoded
        import trackers  # noqa: F401
    for name in cfg["report_to"]:
        try:
            importlib.import_module(TRACKERS[name])
        except ImportError:
            raise UserError(f"--report-to {name} needs the {name} package: pip install {name}") from None
    return cfg, ckpt


SAMPLE = RUN + SAMPLER + [OUT, ("--n", _num(int, 1, 10 ** 7), 64, "samples"),
                          ("--process", "switch", None, "write the reverse process instead: NAME.gif (x_t beside its "
                           "predicted x_0, 10 steps) and NAME.png (those steps, up to 8 samples) for --out NAME.png")]


def cmd_sample(args):
    """sample a PNG grid (or a PNG per image), or picture the reverse process

    --process: NAME.gif (x_t beside x̂_0 at 10 steps, looping, the last frame held) and NAME.png (the same 10 steps
    left to right, two rows for each of the first 8 samples: x_t above x̂_0)."""
    pictures = importlib.import_module("pictures") if args.process else None
    run = load_run(args)
    labels, nrow, name = labels_from_args(args, run, args.n, rows=True)
    n = args.n if labels is None else len(labels)
    if not args.process:
        return write_run(args, run, f"{name}.png", draw(run, n, y=labels), partial(to_image, nrow=nrow), "samples")
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
    OUT, ("--n", _num(int, 1, 10 ** 5), 8, "results: a random N of FOLDER's images, or IMAGE N times, each with noise "
          "of its own"),
    ("--mask", str, None, "a PNG, white where the model paints, of the model's or the image's size (default: the "
     "centre square of half the side)"),
    ("--resample", _num(int, 1, 100), 1, "RePaint's resampling: each step redone R times (R × the cost; R > 1 samples "
     "with DDIM, 25 steps, η = 1 unless given)")]


def cmd_inpaint(args):
    """fill in images where a mask is white: rows of input, mask and result

    After every step the known pixels are drawn anew from q (Diffusion.paste_known); at the end, the input's."""
    import pictures
    run = load_run(args, resample=args.resample)
    images, labels, index = edit_inputs(args, run)
    x_known = images[index]
    known = load_mask(args.mask, run.cfg["image_size"], args.input).expand(args.n, *run.shape)
    shown = (1 - known) * 2 - 1  # white where the model paints

    def strip(results):
        rows = [[to_uint8(x) for x in row] for row in zip(x_known, shown, results)]
        return pictures.editing_strip(rows, ["input", "mask", "inpainted"])
    batches = draw(run, args.n, y=labels, known=(x_known, known, args.resample))
    return write_run(args, run, "inpaint.png", batches, strip, "results of inpaint")


INTERPOLATE = RUN + SAMPLER + [OUT, ("--frames", _num(int, 2, 1000), 8, "samples a row")]


def cmd_interpolate(args):
    """samples from the slerp of two seeded noises, sampled deterministically: a row for --class, else one per class

    The frames of a row are the samples of slerp(z1, z2, λ) for λ from 0 to 1, z1 and z2 drawn with --seed."""
    import pictures
    run = load_run(args, deterministic=True)
    labels = labels_from_args(args, run, 1, rows=True)[0]  # --class's row, or one per class (None: unconditional)
    rows = 1 if labels is None else len(labels)
    g = torch.Generator().manual_seed(args.seed)
    z1 = torch.randn(run.shape, generator=g)
    z2 = torch.randn(run.shape, generator=g)
    lams = [j / (args.frames - 1) for j in range(args.frames)]
    noise = torch.stack([slerp(z1, z2, lam) for lam in lams]).repeat(rows, 1, 1, 1)
    y = None if labels is None else labels.repeat_interleave(args.frames)
    names = [] if labels is None else [run.classes[c][:7] for c in labels.tolist()]

    def strip(results):
        grid = [[to_uint8(x) for x in row] for row in results.split(args.frames)]
        return pictures.editing_strip(grid, [f"{lam:.2f}" for lam in lams], names)  # the font has no λ
    return write_run(args, run, "interpolate.png", draw(run, len(noise), y=y, noise=noise), strip,
                     "results of interpolate")


IMG2IMG = [INPUT] + RUN + SAMPLER + [
    OUT, ("--n", _num(int, 1, 10 ** 5), 4, "results for each strength: a random N of FOLDER's images, or IMAGE N "
          "times, each with noise of its own"),
    ("--strength", _numbers(float, 0, 1), (0.5,), "0 returns the input, 1 is plain sampling; several, comma-separated, "
     "give a row each")]


def cmd_img2img(args):
    """image-to-image (SDEdit): noise images to t = strength · (T − 1), then sample from there

    For each input and strength a row: the input, then its results."""
    import pictures
    run = load_run(args)
    images, labels, index = edit_inputs(args, run)

    def strip(results):
        results = results.view(len(args.strength), args.n, *run.shape)
        rows = [[image, *results[s][index == i]] for i, image in enumerate(images) for s in range(len(results))]
        columns = ["input"] + [f"seed {k + 1}" for k in range(len(rows[0]) - 1)]
        names = [f"s={s:g}" for s in args.strength] * len(images)
        return pictures.editing_strip([[to_uint8(x) for x in row] for row in rows], columns, names)
    batches = (b for s in args.strength for b in draw(run, args.n, y=labels, image=images[index], strength=s))
    return write_run(args, run, "img2img.png", batches, strip, "results of img2img")


FID = RUN + SAMPLER + [INCEPTION, DATA_ROOT, WORKERS, JSON,
        ("--ref", str, None, "cifar10 or mnist (their training sets), an image folder, or an .npz of mu and sigma "
         "(pytorch-fid's format) (default: the checkpoint's training data)"),
        ("--n", _num(int, 2, 10 ** 7), None, "samples (default: 50,000 on CUDA, as the papers; 1,000 on a CPU: small n "
         "biases FID upwards, compare only equal n)"),
        ("--samples", str, None, "score this image folder instead of a checkpoint (all its images, or a random --n)"),
        ("--image-size", _size, None, "with --samples: decode at this size (default: the folder's own)"),
        ("--ref-n", _num(int, 2, 10 ** 7), None, "a fixed random subset of the reference images (default: all)")]


def cmd_fid(args):
    """FID of a checkpoint's samples, drawn as `sample` draws them, or of --samples DIR, against --ref"""
    device = get_device(args.device)
    fid, net = inception(args.inception, device)
    amp = nullcontext()
    if args.samples:
        pick = random_subset(args.n, torch.Generator().manual_seed(args.seed))
        images = load_images(args.samples, image_size=args.image_size, pick=pick, flag="--samples")[0]
        batches = images.split(50)
        shape = images.shape[1:]
        source = args.samples
        data = None
        result = dict(samples=source)
    else:
        run = load_run(args)
        n = args.n or (50_000 if device.type == "cuda" else 1000)  # the papers' 50,000; a CPU: seconds a sample
        batches = map(to_uint8, draw(run, n, y=labels_from_args(args, run, n, rows=False)[0]))
        shape = run.shape
        amp = autocast(device, run.precision)  # Inception itself runs in fp32 (inception_stats)
        source = f"{run.path} ({describe(run)}, guidance {args.guidance}, seed {args.seed}, {run.precision})"
        data = run.cfg["data"]
        result = dict(ckpt=run.path, sampler=describe(run), guidance=args.guidance, seed=args.seed,
                      precision=run.precision)
    ref = args.ref or data
    if ref is None:
        raise UserError("--ref: which images to compare with? (cifar10, mnist, a folder or an .npz)")
    # The reference first: its statistics are cached, and a bad --ref is refused before any sampling
    stats = fid_reference(fid, net, ref, args.data_root, tuple(shape[1:]), args.ref_n, args.num_workers, shape[0])
    torch.manual_seed(args.seed)
    with amp:
        mu, sigma, n = fid.inception_stats(net, batches)
    score = fid.frechet_distance(mu, sigma, *stats[:2])
    result = dict(fid=round(score, 4), n=n, **result, ref=ref, ref_n=stats[2])
    print(json.dumps(result) if args.json else f"FID {score:.3f} of {n} images from {source} against {ref} (n "
          f"{stats[2]})")
    return 0


NLL_CPU_T_SAMPLES = 100  # `nll --t-samples` on a CPU (GPU: all T terms); measured: docs/measurements.md


NLL = RUN + [CKPT, DATA_ROOT, WORKERS, JSON,
        ("--data", str, None, "cifar10, mnist, fashion-mnist or a folder, scored whole (default: the model's data)"),
        ("--split", ("train", "test"), None, "the split of cifar10, mnist or fashion-mnist (default: test)"),
        ("--n", _num(int, 2, 10 ** 7), None, "a fixed random subset of the images, as fid --n (default: all)"),
        ("--t-samples", _num(int, 1, 10 ** 5), None, "estimate the sum of the KL terms from K of them an image: "
         "t = 1 … K/2 exactly, K/2 of the rest drawn uniformly and scaled; unbiased, and the prior and decoder stay "
         f"exact (default: all T − 1 on a GPU, {NLL_CPU_T_SAMPLES} on a CPU)"),
        ("--variance", ("fixedlarge", "fixedsmall"), None, "σ²_t of p_θ: β_t (Ho et al.'s CIFAR-10) or the posterior's "
         "β̃_t (default: the model's)")]


def cmd_nll(args):
    """the variational bound in bits/dim (Ho et al.'s Table 2) of a checkpoint on a data set's test images

    Of the EMA model; a class-conditional one through its null label: p(x), as the paper's."""
    import nll
    run = load_run(args, "nll")
    variance = args.variance or run.cfg["variance"]
    diffusion = Diffusion(run.cfg["timesteps"], run.cfg["schedule"], variance, device=run.device)
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
    pick = random_subset(args.n, torch.Generator().manual_seed(args.seed))
    images = load_images(data, args.data_root, run.cfg["image_size"], args.num_workers, pick,
                         train=args.split == "train")[0]
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
        ("--keep-classes", "switch", None, "with --format diffusers: keep the class embedding (num_class_embeds = "
         "classes + 1, the last the null label)")]


def cmd_export(args):
    """a checkpoint's EMA model, to share (fp16) or for diffusers' DDPMPipeline"""
    out = args.out.rstrip("/" + os.sep) or args.out
    if os.path.exists(out):
        raise UserError(f"--out {out} exists: choose a new path")
    ensure_writable(os.path.dirname(os.path.abspath(out)), "--out")
    path = find_checkpoint(args.ckpt)
    if args.format == "fp16":
        export_model(path, out)
    else:
        import convert
        tmp = f"{out}.tmp{os.getpid()}"
        try:
            convert.save_diffusers(load_checkpoint(path), tmp, args.keep_classes)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote the EMA model of {path} to {out} ({args.format})", file=sys.stderr)
    return 0


FORWARD = [SEED, DATA_ROOT,
        ("--data", str, "cifar10", "cifar10, mnist, fashion-mnist or an image folder"),
        ("--image-size", _num(int, 4, 4096), None, "side in pixels (default: the data's own; folders: 32)"),
        ("--n", _num(int, 1, 100), 3, "training images, two rows each: linear and cosine schedule"),
        ("--out", str, None, "PNG file (default: outputs/forward_<data>.png)")]


def cmd_forward(args):
    """picture the forward process q(x_t | x_0): training images at 10 t turning into noise, and the schedules"""
    import pictures
    size = args.image_size or NATIVE_SIZE.get(args.data, 32)
    g = torch.Generator().manual_seed(args.seed)
    x0 = load_images(args.data, args.data_root, size, pick=random_subset(args.n, g))[0]
    x0 = x0.float() / 127.5 - 1  # decoded: just the n chosen images, not the whole folder
    schedules = {s: Diffusion(1000, s) for s in ("linear", "cosine")}
    rows, ts = forward_process(x0, torch.randn(x0.shape, generator=g), list(schedules.values()))
    out = sample_out(args.out, f"forward_{os.path.basename(os.path.normpath(args.data))}.png")[0]
    save_atomic(out, pictures.forward_strip([[to_uint8(x) for x in row] for row in rows], ts).save)
    chart = os.path.splitext(out)[0] + "_schedule.png"  # and the numbers behind it, at the CPU sampler's steps
    steps, spacing = SAMPLERS["dpm++"]
    fig = pictures.schedule_chart({s: d.alphas_cumprod for s, d in schedules.items()},
                                  {s: d.sampling_steps(steps, spacing) for s, d in schedules.items()},
                                  f"{steps} {spacing} steps (DPM-Solver++)", schedules["linear"].sampling_steps(25),
                                  "25 uniform steps (DDIM)")
    save_atomic(chart, lambda f: fig.savefig(f, format="png"))
    print(f"wrote q(x_t | x_0) of {len(x0)} images of {args.data} at t = {ts} to {out}, its schedules to {chart}",
          file=sys.stderr)
    return 0


# Each command: its handler, whose docstring's first line is its --help, and its flags, which stand above the handler
COMMANDS = {"train": (cmd_train, TRAIN + TRAIN_ONLY), "sample": (cmd_sample, SAMPLE),
            "inpaint": (cmd_inpaint, INPAINT), "interpolate": (cmd_interpolate, INTERPOLATE),
            "img2img": (cmd_img2img, IMG2IMG), "fid": (cmd_fid, FID), "nll": (cmd_nll, NLL),
            "export": (cmd_export, EXPORT), "forward": (cmd_forward, FORWARD)}


def main(argv=None):
    parser = _Parser(prog="ddpm.py", description="DDPM (Ho et al. 2020): train on images, sample with guidance.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (handler, rows) in COMMANDS.items():
        help_line = handler.__doc__.splitlines()[0]  # no abbreviations: interpolate --n is not --no-compile
        command = sub.add_parser(name, help=help_line, description=help_line, allow_abbrev=False)
        _add_options(command, rows, given_only=name == "train")
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][0](args)
    except UserError as e:
        message, code = str(e), e.code
    except ImportError as e:  # a package, or a file that comes with ddpm.py, that this command needs
        message, code = missing(e, args.command), 2
    except ValueError as e:  # fid.py's FIDError, convert.py's ConvertError: a file or a count the user can fix
        if type(e).__module__ not in ("fid", "convert"):
            raise
        message, code = str(e), 2
    except torch.OutOfMemoryError:
        message, code = "out of GPU memory; try a smaller --batch-size", 2
    except OSError as e:  # a full disk or a folder gone while writing: save_atomic has left no partial file
        message, code = f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}", 1
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    if not int(os.environ.get("RANK", 0)):  # under torchrun, one line from rank 0 rather than one per process
        print(f"ddpm.py: error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
