"""Tests for ddpm.py: formulas against closed forms or independent computations, the network, the samplers,
the training loop (overfit, exact resume, interruption) and every user error. CPU only, under a minute."""
import errno, glob, importlib, json, math, multiprocessing, os, re, shutil, signal, socket, struct, subprocess, sys
import builtins, time

import numpy as np

import pytest
import torch
from PIL import Image

import ddpm
import fid
from conftest import CIFAR10_CLASSES, HERE, TINY, FakeInception, Oracle, grey_run, randomize, run_main


# ---------------------------------------------------------------------------------------------- schedule, q, posterior
def test_linear_schedule_matches_closed_form():
    d = ddpm.Diffusion(1000, "linear")
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    assert torch.allclose(d.betas.double(), torch.tensor(betas, dtype=torch.float64), rtol=1e-6)
    alphabar_last = math.prod(1 - b for b in betas)                           # ᾱ_{T−1} = ∏ (1 − β_i)
    assert abs(alphabar_last - 4.0358e-5) < 1e-8
    assert d.alphas_cumprod[-1].item() == pytest.approx(alphabar_last, rel=1e-4)
    # Other T: the range is scaled by 1000/T, so ᾱ_{T−1} stays near 0.
    d200 = ddpm.Diffusion(200, "linear")
    assert d200.betas[0].item() == pytest.approx(5e-4) and d200.betas[-1].item() == pytest.approx(0.1)
    assert d200.alphas_cumprod[-1].item() < 1e-4


def test_cosine_schedule_matches_closed_form():
    T, s = 1000, 0.008
    d = ddpm.Diffusion(T, "cosine")
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in [0, 10, 500, 900]:                                   # ᾱ_t = f(t + 1) / f(0), before the β clip bites
        assert d.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert d.betas.max().item() == pytest.approx(0.999)


def test_q_sample_statistics():
    d = ddpm.Diffusion(1000)
    x0 = torch.tensor([-0.9, -0.2, 0.3, 1.0]).view(1, 4, 1, 1)
    n = 20000
    for t in [0, 100, 500, 999]:
        xt = d.q_sample(x0.expand(n, 4, 1, 1), torch.full((n,), t), torch.randn(n, 4, 1, 1))
        a = d.alphas_cumprod[t].item()
        mean, var = xt.mean(0).flatten(), xt.var(0).flatten()
        assert torch.allclose(mean, math.sqrt(a) * x0.flatten(), atol=5 * math.sqrt((1 - a) / n) + 1e-6)
        assert torch.allclose(var, torch.full((4,), 1 - a), rtol=0.05, atol=1e-6)


def test_posterior_equals_gaussian_product():
    d = ddpm.Diffusion(1000)
    b = d.betas.double()
    abar = torch.cumprod(1 - b, 0)
    x0, xt = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    for t in [1, 2, 50, 500, 999]:
        # q(x_{t−1} | x_t, x_0) ∝ N(x_t; sqrt(α_t) x_{t−1}, β_t) · N(x_{t−1}; sqrt(ᾱ_{t−1}) x_0, 1 − ᾱ_{t−1})
        precision = (1 - b[t]) / b[t] + 1 / (1 - abar[t - 1])
        mean = ((1 - b[t]).sqrt() / b[t] * xt.double()
                + abar[t - 1].sqrt() / (1 - abar[t - 1]) * x0.double()) / precision
        got_mean, got_var = d.q_posterior_mean_variance(x0, xt, torch.full((5,), t))
        assert torch.allclose(got_mean.double(), mean, atol=1e-5)
        assert torch.allclose(got_var.double().flatten(), (1 / precision).expand(5), rtol=1e-4)
    # t = 0: x_0 is known exactly given x_1.
    got_mean, got_var = d.q_posterior_mean_variance(x0, xt, torch.zeros(5, dtype=torch.long))
    assert torch.allclose(got_mean, x0, atol=1e-6) and got_var.abs().max() == 0


def test_x0_recovered_from_xt_and_true_eps():
    d = ddpm.Diffusion(1000)
    x0, eps = torch.rand(6, 3, 4, 4) * 2 - 1, torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 1, 10, 300, 700, 999])
    assert torch.allclose(d.predict_x0_from_eps(d.q_sample(x0, t, eps), t, eps), x0, atol=2e-4)


@pytest.mark.parametrize("variance", ["fixedlarge", "fixedsmall"])
def test_p_mean_variance(variance):
    d = ddpm.Diffusion(100, variance=variance)
    x_star = torch.rand(1, 3, 4, 4) * 4 - 2                      # outside [-1, 1]: x̂_0 must come back clipped
    model = Oracle(d, x_star)
    t = torch.tensor([0, 1, 50, 99])
    xt = d.q_sample(x_star.expand(4, -1, -1, -1), t, torch.randn(4, 3, 4, 4))
    mean, var, pred_x0 = d.p_mean_variance(model, xt, t)
    assert torch.allclose(pred_x0, x_star.clamp(-1, 1).expand(4, -1, -1, -1), atol=1e-3)
    b, bt = d.betas, d.posterior_variance
    want = [bt[1], b[1], b[50], b[99]] if variance == "fixedlarge" else [bt[0], bt[1], bt[50], bt[99]]
    assert torch.allclose(var.flatten(), torch.stack(want))
    assert torch.allclose(mean, d.q_posterior_mean_variance(pred_x0, xt, t)[0])


# ---------------------------------------------------------------------------------------------- U-Net
@pytest.mark.parametrize("in_ch,size,ch_mult,attn,classes", [
    (3, 32, (1, 2, 2, 2), (16,), None), (1, 16, (1, 2), (8,), 10), (3, 8, (1,), (), 3),
    (4, 24, (1, 1, 2), (12, 6), None)])
def test_unet_shapes(in_ch, size, ch_mult, attn, classes):
    model = ddpm.UNet(in_ch, 16, ch_mult, 1, attn, 0.1, size, classes)
    x = torch.randn(3, in_ch, size, size)
    y = None if classes is None else torch.tensor([0, classes - 1, classes])     # includes the null label
    out = model(x, torch.tensor([0, 5, 999]), y)
    assert out.shape == x.shape
    assert out.abs().max() == 0                                  # zero-initialised output conv: ε̂ = 0 at init


def test_attention_matches_explicit_softmax_in_both_layouts():
    """Single-head attention written out: softmax(q kᵀ / √C) v over the H·W positions; the copy-free path that
    channels_last (the GPU layout) takes must give the same numbers."""
    block = randomize(ddpm.AttnBlock(32))
    x = torch.randn(2, 32, 4, 6)
    with torch.no_grad():
        qkv = block.qkv(block.norm(x)).flatten(2)                                  # (B, 3C, HW)
        q, k, v = qkv[:, :32], qkv[:, 32:64], qkv[:, 64:]
        w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=-1)          # (B, HW, HW)
        expected = x + block.proj((v @ w.transpose(1, 2)).reshape(2, 32, 4, 6))
        assert torch.allclose(block(x), expected, atol=1e-5)
        last = block.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(last, expected, atol=1e-5)


def test_default_unet_is_the_papers_35_7m():
    n = sum(p.numel() for p in ddpm.UNet().parameters())
    assert abs(n - 35.7e6) <= 0.1e6, n


@pytest.mark.parametrize("size,ch_mult,params", [(256, (1, 1, 2, 2, 4, 4), 113_673_219), (64, (1, 2, 3, 4), None)])
def test_larger_images_get_a_network_of_their_size_256_px_is_ho_et_als_114m(size, ch_mult, params, monkeypatch,
                                                                              tmp_path):
    cfgs = []
    monkeypatch.chdir(tmp_path)

    class Trainer:  # takes the config the flags make, and stops there
        def __init__(self, cfg, *args):
            cfgs.append(cfg)

        def run(self):
            return 0
    monkeypatch.setattr(ddpm, "Trainer", Trainer)
    assert ddpm.main(["train", "--data", "imgs", "--image-size", str(size), "--unconditional"]) == 0
    assert ddpm.main(["train", "--data", "imgs", "--image-size", str(size), "--ch-mult", "1,2,2,2,2,2"]) == 0
    cfg, mine = cfgs
    assert tuple(cfg["ch_mult"]) == ch_mult and mine["ch_mult"] == (1, 2, 2, 2, 2, 2)  # given: kept as given
    if params:  # Ho et al. App. B: 114M parameters, and their run_celebahq.py's lr, batch and dropout
        assert (cfg["lr"], cfg["batch_size"], cfg["dropout"], cfg["attn_res"]) == (2e-5, 64, 0.0, (16,))
        with torch.device("meta"):  # counted, not allocated
            assert sum(p.numel() for p in ddpm.unet_from_config(dict(cfg, channels=3), None).parameters()) == params


def test_unet_rejects_indivisible_image_size():
    with pytest.raises(ValueError, match="not divisible by 4"):
        ddpm.UNet(ch_mult=(1, 2, 2), image_size=18)


# ---------------------------------------------------------------------------------------------- loss and guidance
def test_training_loss_draws_all_t_and_drops_labels_per_sample():
    class Spy(torch.nn.Module):
        num_classes = 10

        def forward(self, x, t, y=None):
            self.t, self.y = t, y
            return torch.zeros_like(x)
    d, spy = ddpm.Diffusion(50), Spy()
    y = torch.randint(0, 10, (4000,))
    loss = d.training_loss(spy, torch.zeros(4000, 3, 2, 2), y, p_uncond=0.3)
    assert loss.item() == pytest.approx(1.0, abs=0.02)           # ε̂ = 0: the loss is E[ε²] = 1
    assert spy.t.min() == 0 and spy.t.max() == 49                 # t ~ U{0, …, T−1}
    dropped = spy.y == 10
    assert 0.27 < dropped.float().mean() < 0.33                   # per sample, not all-or-nothing per batch
    assert torch.equal(spy.y[~dropped], y[~dropped])


def test_each_loss_matches_its_closed_form_on_a_fixed_prediction():
    d, eps_hat = ddpm.Diffusion(50), torch.linspace(-3, 3, 96).view(2, 3, 4, 4)  # errors both sides of Huber's β = 1

    class Fixed(torch.nn.Module):
        num_classes = None

        def forward(self, x, t, y=None):
            return eps_hat
    x0 = torch.rand(2, 3, 4, 4) * 2 - 1
    closed = {"l2": lambda e: (e ** 2).mean(), "l1": lambda e: e.abs().mean(),
              "huber": lambda e: torch.where(e.abs() < 1, e ** 2 / 2, e.abs() - 0.5).mean()}
    for name, form in closed.items():
        got = d.training_loss(Fixed(), x0, generator=torch.Generator().manual_seed(0), loss=name)
        g = torch.Generator().manual_seed(0)  # the same draws again: t, then ε
        torch.randint(0, 50, (2,), generator=g)
        assert got.item() == pytest.approx(form(torch.randn(x0.shape, generator=g) - eps_hat).item(), rel=1e-6), name
    with pytest.raises(KeyError):
        d.training_loss(Fixed(), x0, loss="l3")


def test_guidance():
    d = ddpm.Diffusion(50)
    model = randomize(ddpm.UNet(3, 16, (1, 2), 1, (), 0.0, 8, num_classes=5))
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 30, 49]), torch.tensor([0, 1, 2, 4])
    with torch.no_grad():
        eps_c, eps_u = model(x, t, y), model(x, t, torch.full_like(y, 5))
        assert torch.equal(d.predict_eps(model, x, t, y, 1.0), eps_c)
        assert not torch.allclose(eps_c, eps_u, atol=1e-3)          # the null label changes the prediction
        assert torch.allclose(model(x, t, None), eps_u)               # y = None means the null label
        for s in [0.0, 3.0]:
            assert torch.allclose(d.predict_eps(model, x, t, y, s), eps_u + s * (eps_c - eps_u), atol=1e-4)


# ---------------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("steps,eta", [(None, 0.0), (10, 0.0), (10, 1.0), (100, 0.5)])
def test_samplers_reach_the_data_under_an_exact_oracle(steps, eta):
    d = ddpm.Diffusion(100)
    x_star = torch.rand(1, 3, 4, 4) * 2 - 1
    model = Oracle(d, x_star)
    x = d.sample(model, 3, steps=steps, eta=eta, generator=torch.Generator().manual_seed(0))
    # Exactly x*: ancestral must add no noise at the last step (σ at t = 0 would leave ~0.01 of it).
    assert torch.allclose(x, x_star.expand(3, -1, -1, -1), atol=1e-4)
    ts = [int(t[0]) for t in model.calls]
    assert ts[0] == 99 and ts[-1] == 0 and ts == sorted(ts, reverse=True) and len(ts) == (steps or 100)


def test_ddim_eta0_is_deterministic_given_the_start_noise():
    d = ddpm.Diffusion(50)
    model = randomize(ddpm.UNet(3, 16, (1, 2), 1, (), 0.0, 8, num_classes=3))
    noise, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    run = lambda eta, seed: d.sample(model, 2, y, 2.0, 10, eta, torch.Generator().manual_seed(seed), noise)
    assert torch.equal(run(0.0, 1), run(0.0, 2))
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))
    assert run(0.0, 1).abs().max() <= 1


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_spacings_are_ascending_distinct_and_run_from_0_to_T_minus_1(schedule):
    for T in [2, 3, 5, 50, 1000]:
        d = ddpm.Diffusion(T, schedule)
        for S in sorted({2, 3, 5, 10, 25, 100, T} & set(range(2, T + 1))):
            for spacing in ["uniform", "quadratic", "logsnr"]:
                ts = d.sampling_steps(S, spacing)
                assert len(ts) == S and ts == sorted(set(ts)) and ts[0] == 0 and ts[-1] == T - 1, (T, S, spacing, ts)
        assert d.sampling_steps(1, "logsnr") == [T - 1]  # one step: from the noise straight to x̂_0
    d = ddpm.Diffusion(1000, schedule)
    assert d.sampling_steps(10) == torch.linspace(0, 999, 10).round().long().tolist()  # DDIM's list, as it was
    assert d.sampling_steps(10, "quadratic") == [round(999 * (i / 9) ** 2) for i in range(10)]
    assert d.sampling_steps(100, "quadratic")[:4] == [0, 1, 2, 3]  # 999 (1/99)² rounds to 0: moved apart, not lost
    # log-SNR: each t is the step whose λ_t = ½ log(ᾱ_t / (1 − ᾱ_t)) is nearest to 10 evenly spaced λ (ᾱ from β here;
    # cosine's last β, clamped at 0.999, drops λ by 3.5 in one step: there the steps crowd and are moved apart)
    a = torch.cumprod(1 - ddpm.make_betas(schedule, 1000), 0)
    lam = (a / (1 - a)).log() / 2
    ts = d.sampling_steps(10, "logsnr")
    for t, target in zip(ts, torch.linspace(lam[0], lam[-1], 10, dtype=torch.float64)):
        assert schedule == "cosine" or (lam[t] - target).abs() <= (lam - target).abs().min() + 1e-4, (t, target)
    with pytest.raises(ValueError):
        d.sampling_steps(10, "cubic")


class Gaussian(Oracle):
    """The exact ε for data N(μ, s² I): x_t ~ N(sqrt(ᾱ) μ, (ᾱ s² + 1 − ᾱ) I), ε̂ = sqrt(1 − ᾱ) (x_t − sqrt(ᾱ) μ) /
    (ᾱ s² + 1 − ᾱ). Along the probability-flow ODE z = (x_t − sqrt(ᾱ_t) μ) / sqrt(ᾱ_t s² + 1 − ᾱ_t) stays fixed."""
    def __init__(self, diffusion, mu, s, shape=(1, 8, 8)):
        super().__init__(diffusion, torch.zeros(1, *shape))
        self.mu, self.s = mu, s

    def forward(self, x, t, y=None):
        a = self.d.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        return ((1 - a).sqrt() * (x.double() - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a)).float()

    def exact(self, x_start, t):  # the ODE's solution at t from x_{T−1} = x_start
        a = self.d.alphas_cumprod.double()
        z = (x_start.double() - a[-1].sqrt() * self.mu) / (a[-1] * self.s ** 2 + 1 - a[-1]).sqrt()
        return a[t].sqrt() * self.mu + (a[t] * self.s ** 2 + 1 - a[t]).sqrt() * z


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_is_first_order_and_dpm_solver_second_order_on_gaussian_data(schedule):
    d = ddpm.Diffusion(1000, schedule)
    model, noise = Gaussian(d, 0.1, 0.2), torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = [16, 24, 32, 48, 64]
    for sampler, order in [("ddim", 1.0), ("dpm++", 2.0)]:
        errors = []
        for S in steps:
            path = {}
            d.sample(model, 64, steps=S, noise=noise, sampler=sampler, spacing="logsnr",
                     callback=lambda t, x_t, x0: path.__setitem__(t, x_t))
            # the largest error along the path, down to t = 10: below it the integer t cannot follow the spacing
            # (1 − ᾱ_t ≈ β_0 (t + 1), so from t = 0 to t = 1 λ moves by ½ log 2 whatever S), and steps stop shrinking
            errors.append(max((x_t.double() - model.exact(noise, t)).abs().max().item() for t, x_t in path.items()
                              if t >= 10))
        slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]  # error ∝ S^−order
        assert abs(slope - order) < 0.2, (sampler, slope, errors)


def test_dpm_solver_is_ddim_where_it_is_first_order_and_guidance_goes_through_it():
    d = ddpm.Diffusion(50)
    # the network of earlier releases, on which these margins were measured (a random network's rounding is chaotic)
    model = randomize(ddpm.UNet(3, 16, (1, 2), 1, (), 0.0, 8, num_classes=3, same_padding=False, norm_eps=1e-5))
    noise, y = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2])
    run = lambda m, sampler, steps, s=2.0, spacing="logsnr": d.sample(m, 2, y, s, steps, noise=noise, sampler=sampler,
                                                                     spacing=spacing)
    # Below 15 steps its first step and the one into t = 0 are first order, and the last is x̂_0: 3 steps are DDIM's
    for spacing in ["uniform", "logsnr"]:
        assert torch.allclose(run(model, "dpm++", 3, spacing=spacing), run(model, "ddim", 3, spacing=spacing),
                              atol=1e-5)
    assert not torch.allclose(run(model, "dpm++", 8), run(model, "ddim", 8), atol=1e-3)  # the second-order terms act

    class Guided(torch.nn.Module):  # ε_u + s (ε_c − ε_u) from two separate evaluations, handed over as a plain model
        in_channels, image_size, num_classes = 3, 8, None

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t, _):
            eps_u = model(x, t, torch.full_like(y, 3))
            return eps_u + 2.5 * (model(x, t, y) - eps_u)
    assert torch.allclose(run(model, "dpm++", 8, 2.5), run(Guided(), "dpm++", 8, 1.0), atol=1e-5)
    assert run(model, "dpm++", 8, 4.0).abs().max() <= 1  # x̂_0 is clipped, so the result stays in range
    oracle = Oracle(d, torch.rand(1, 3, 8, 8) * 2 - 1)  # one data point: every x̂_0 is that point
    x = d.sample(oracle, 2, steps=6, sampler="dpm++", noise=noise)
    assert torch.allclose(x, oracle.x_star.expand_as(x), atol=1e-4)
    assert [int(t[0]) for t in oracle.calls] == d.sampling_steps(6, "uniform")[::-1]


@pytest.mark.parametrize("capability,flags,sample", [
    ("AVX512", {"amx_bf16": True, "avx512_bf16": True}, "bf16"),    # Intel since Sapphire Rapids (AMX)
    ("AVX512", {"amx_bf16": False, "avx512_bf16": True}, "bf16"),   # AMD since Zen 4
    ("AVX512", {"amx_bf16": False, "avx512_bf16": False}, "fp32"),  # AVX-512 without bf16 (Skylake-X, Ice Lake)
    ("AVX2", {"amx_bf16": False, "avx512_bf16": False}, "fp32"),    # bf16 emulated: 7× slower
    ("AVX2", {"amx_bf16": True, "avx512_bf16": True}, "fp32"),      # ATen held to AVX2 (ATEN_CPU_CAPABILITY=avx2)
    ("DEFAULT", {}, "fp32")])
def test_precision_auto_is_bf16_for_cpu_sampling_only_where_the_cpu_computes_bf16(capability, flags, sample):
    cpu = torch.device("cpu")
    assert ddpm.resolve_precision("auto", cpu, "sample", (capability, flags)) == sample
    assert ddpm.resolve_precision("auto", cpu, "train", (capability, flags)) == "fp32"  # 1.1× is not worth it
    for forced in ("fp32", "bf16"):
        assert ddpm.resolve_precision(forced, cpu, "sample", (capability, flags)) == forced
    assert ddpm.resolve_precision("auto", torch.device("cuda"), "train") == "bf16"
    assert ddpm.resolve_precision("auto", torch.device("mps"), "sample") == "fp32"


def test_a_bf16_sample_equals_the_fp32_one_to_rounding_and_steps_in_fp32():
    d, cpu = ddpm.Diffusion(50), torch.device("cpu")
    # the network of earlier releases, on which the margin was measured (a random network's rounding is chaotic)
    model = randomize(ddpm.UNet(3, 16, (1, 2), 1, (4,), 0.0, 8, num_classes=3, same_padding=False, norm_eps=1e-5))
    noise, y = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])
    dtypes = []
    run = lambda: d.sample(model, 4, y, 2.0, 10, noise=noise, sampler="dpm++", spacing="quadratic",
                           callback=lambda t, x_t, x0: dtypes.append((x_t.dtype, x0.dtype)))
    fp32 = run()
    with ddpm.autocast(cpu, "bf16"):
        bf16 = run()
    assert bf16.dtype == torch.float32 and set(dtypes) == {(torch.float32, torch.float32)}  # x_t, x̂_0, the clip
    rmse = (bf16 - fp32).pow(2).mean().sqrt().item()
    assert 0 < rmse < 0.02, rmse  # measured 0.0075 (bf16 keeps 8 bits: 0.4 % a product); 0: autocast did nothing


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_update_matches_formula():
    model = torch.nn.Linear(3, 2)
    ema = ddpm.EMA(model, decay=0.5)
    shadow = [p.detach().clone() for p in model.parameters()]
    for n in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(0.5, (1 + n) / (10 + n))                          # warm-up, then the fixed decay
        shadow = [d * s + (1 - d) * p.detach() for s, p in zip(shadow, model.parameters())]
        for s, e in zip(shadow, ema.model.parameters()):
            assert torch.allclose(s, e, atol=1e-6)
    assert ema.num_updates == 12 and not ema.model.training


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_with_weights_only(ckpts):
    raw = torch.load(ckpts["cond"], weights_only=True)
    assert raw["step"] == 2 and raw["classes"] == ["cat", "ship"] and raw["config"]["ch_mult"] == (1, 2)
    assert not any(k.startswith("_orig_mod") for k in raw["model"])
    model, diffusion, classes, cfg = ddpm.load_sampler(ckpts["cond"], torch.device("cpu"))
    assert diffusion.num_timesteps == 50 and not model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw["ema"]["model"][k])


def test_atomic_save_keeps_the_old_file_when_a_save_dies(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    ddpm.save_atomic(path, lambda f: torch.save({"w": torch.ones(3)}, f), durable=True)

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        ddpm.save_atomic(path, lambda f: torch.save({"w": torch.zeros(3)}, f), durable=True)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    with pytest.raises(OSError):  # a picture whose save dies (not durable) leaves no temporary file either
        ddpm.save_atomic(str(tmp_path / "grid.png"), lambda f: dying_save(None, f))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_crafted_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    path = str(tmp_path / "evil.pt")
    torch.save({"config": {}, "classes": [], "ema": Evil(), "step": 0}, path)
    code, err = run_main(["sample", "--ckpt", path], capsys)
    assert code == 2 and "refused" in err and not marker.exists()


def test_a_checkpoint_that_would_call_os_system_is_refused_by_name(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path = str(tmp_path / "evil.pt")
    torch.save({"config": {}, "classes": [], "ema": Evil(), "step": 0}, path)
    for argv in (["sample", "--ckpt", path], ["train", "--data", "imgs", "--init", path, "--out", str(tmp_path / "r")]):
        code, err = run_main(argv, capsys)
        assert code == 2 and "refused" in err and "posix.system" in err and "corrupt" not in err and not marker.exists()
    assert not os.path.exists(tmp_path / "r")


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tmp_path, monkeypatch, capsys):
    def offline(root, *a, **k):  # torchvision makes its root, then fails to download
        os.makedirs(root, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")
    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    for data in ["cifar10", str(tmp_path / "nowhere")]:
        code, err = run_main(["train", "--data", data, "--out", str(tmp_path / "run"), "--data-root",
                              str(tmp_path / "downloads")], capsys)
        assert code == 2 and err.count("\n") == 1 and not os.path.exists(tmp_path / "run"), err
        assert not os.path.exists(tmp_path / "downloads")  # the download folder it made: gone again


def test_truncated_or_garbage_checkpoint_is_a_clear_error(ckpts, tmp_path, capsys):
    data = open(ckpts["cond"], "rb").read()
    for name, content in [("cut.pt", data[: len(data) // 2]), ("junk.pt", b"not a checkpoint")]:
        (tmp_path / name).write_bytes(content)
        code, err = run_main(["sample", "--ckpt", str(tmp_path / name)], capsys)
        assert code == 2 and "truncated or corrupt" in err and err.count("\n") == 1


def test_export_keeps_the_ema_weights_in_half_precision(ckpts, tmp_path):
    ddpm.export_model(ckpts["cond"], str(tmp_path / "m.pt"))
    full, half = (torch.load(p, weights_only=True) for p in (ckpts["cond"], tmp_path / "m.pt"))
    assert set(half) == {"config", "classes", "step", "ema"} and half["config"]["steps"] == full["step"] == 2
    for k, v in full["ema"]["model"].items():
        assert half["ema"]["model"][k].dtype == (torch.float16 if v.is_floating_point() else v.dtype)
        assert torch.allclose(half["ema"]["model"][k].to(v.dtype), v, rtol=1e-3, atol=1e-4), k
    assert os.path.getsize(tmp_path / "m.pt") < os.path.getsize(ckpts["cond"]) / 3


def test_the_bundled_model_loads_weights_only_and_samples_its_classes(tmp_path, monkeypatch, capsys):
    path = os.path.join(HERE, "samples", "cifar10_small.pt")
    assert os.path.getsize(path) <= 25 * 10 ** 6
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and values only
    assert ckpt["classes"] == list(CIFAR10_CLASSES) and ckpt["step"] > 0
    assert {v.dtype for v in ckpt["ema"]["model"].values()} == {torch.float16}
    model, diffusion, classes, cfg = ddpm.load_sampler(path, torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) == 8_954_883 and not cfg["unconditional"]
    x = diffusion.sample(model, 2, torch.tensor([8, 8]), guidance=2.0, steps=3,
                         generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and x.isfinite().all() and x.abs().max() <= 1 and x.std() > 0.2
    monkeypatch.chdir(tmp_path)  # no runs/ here: `sample` falls back to the bundled model and says so
    code, err = run_main(["sample", "--class", "ship", "--n", "2", "--steps", "2", "--out", "ship.png"], capsys)
    assert code == 0 and "bundled" in err and "DDIM 2 steps" in err and Image.open("ship.png").size == (67, 34)


def test_mnist_through_torchvision_trains_a_one_channel_model_and_writes_grey_pngs(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"  # the original idx files, as torchvision finds them without downloading
    raw.mkdir(parents=True)
    digits = torch.randint(0, 256, (20, 28, 28), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    for split, n in [("train", 20), ("t10k", 4)]:
        header = struct.pack(">4i", 2051, n, 28, 28)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + digits[:n].numpy().tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">2i", 2049, n) + bytes(i % 10 for i in range(n)))
    images, labels, classes = ddpm.load_images("mnist", str(tmp_path), 28)
    assert images.shape == (20, 1, 28, 28) and torch.equal(images[:, 0], digits)
    assert labels.tolist()[:11] == [*range(10), 0]
    assert classes == [str(d) for d in range(10)]  # "7 - seven" → "7": `sample --class 7` is the digit 7
    out = tmp_path / "run"
    code, err = run_main(["train", "--data", "mnist", "--data-root", str(tmp_path), "--preset", "small", "--steps", "2",
                          "--batch-size", "4", "--image-size", "16", "--out", str(out)], capsys)
    cfg = torch.load(out / "ckpt.pt", weights_only=True)["config"]
    assert code == 0 and "note:" not in err and cfg["channels"] == 1
    assert (cfg["ch"], cfg["ch_mult"], cfg["lr"]) == (32, (1, 2, 2), 1e-3)
    assert cfg["batch_size"] == 4  # a flag beats the preset
    code, err = run_main(["sample", "--ckpt", str(out / "ckpt.pt"), "--class", "7", "--n", "2",
                          "--out", str(tmp_path / "7.png")], capsys)
    grid = Image.open(tmp_path / "7.png")
    assert code == 0 and grid.mode == "L" and grid.size == (35, 18) and "DDIM 25 steps" in err  # the CPU default


def test_fashion_mnist_class_names_work_on_a_command_line(monkeypatch):
    import torchvision
    names = torchvision.datasets.FashionMNIST.classes  # torchvision's own: "T-shirt/top", …, "Ankle boot"
    fake = lambda root, train, download: type("DS", (), dict(data=torch.zeros(2, 28, 28, dtype=torch.uint8),
                                                          targets=[0, 9], classes=names))
    monkeypatch.setattr("torchvision.datasets.FashionMNIST", fake)
    images, labels, classes = ddpm.load_images("fashion-mnist", image_size=32)
    assert images.shape == (2, 1, 32, 32) and classes[0] == "t-shirt" and classes[-1] == "ankle-boot"
    assert all(c.replace("-", "").isalpha() for c in classes)


def test_a_folder_of_grey_images_is_one_channel_and_a_mixed_one_rgb(tmp_path):
    for name, mode in [("a", "L"), ("b", "L"), ("c", "RGB")]:
        (tmp_path / "grey" / "x").mkdir(parents=True, exist_ok=True)
        (tmp_path / "mixed" / "x").mkdir(parents=True, exist_ok=True)
        im = Image.new(mode, (8, 8), 200 if mode == "L" else (200, 10, 10))
        im.save(tmp_path / "mixed" / "x" / f"{name}.png")
        if mode == "L":
            im.save(tmp_path / "grey" / "x" / f"{name}.png")
    grey, _, _ = ddpm.load_images(str(tmp_path / "grey"), image_size=8)
    mixed, _, _ = ddpm.load_images(str(tmp_path / "mixed"), image_size=8)
    assert grey.shape == (2, 1, 8, 8) and (grey == 200).all()
    assert mixed.shape == (3, 3, 8, 8) and (mixed[:2] == 200).all() and mixed[2, :, 0, 0].tolist() == [200, 10, 10]


def test_the_paper_model_on_a_cpu_says_it_is_sized_for_a_gpu(folder, tmp_path, monkeypatch, capsys):
    code, err = run_main(["train", "--data", folder, "--image-size", "8", "--batch-size", "1", "--steps", "1",
                          "--sample-every", "0", "--out", str(tmp_path / "run")], capsys)  # one step of it: 1 s
    assert code == 0 and err.count("note:") == 1 and "U-Net is sized for a GPU" in err and "--preset small" in err


# ---------------------------------------------------------------------------------------------- training loop
def test_exact_resume_is_bitwise_identical(folder, tmp_path, capsys):
    args = ["train", "--data", folder, "--steps", "6", "--dropout", "0.3", "--p-uncond", "0.5", "--keep-every", "2",
            *TINY, "--batch-size", "5", "--loss", "huber"]            # batches of 5 over 6 images straddle epochs
    assert ddpm.main(args + ["--out", str(tmp_path / "straight")]) == 0
    half = args + ["--out", str(tmp_path / "resumed")]
    assert ddpm.main([*half[:half.index("--steps") + 1], "3", *half[half.index("--steps") + 2:]]) == 0
    assert ddpm.main(["train", "--resume", "--out", str(tmp_path / "resumed"), "--steps", "6"]) == 0
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("straight", "resumed"))
    assert a["step"] == b["step"] == 6 and b["ema"]["num_updates"] == 6 and a["config"]["loss"] == "huber"
    for part in ("model", "optimizer"):
        flat_a, flat_b = torch.utils._pytree.tree_flatten(a[part])[0], torch.utils._pytree.tree_flatten(b[part])[0]
        assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(flat_a, flat_b))
    assert all(torch.equal(a["ema"]["model"][k], v) for k, v in b["ema"]["model"].items())
    assert sorted(f for f in os.listdir(tmp_path / "straight") if f.startswith("ckpt_")) == \
        ["ckpt_00000002.pt", "ckpt_00000004.pt", "ckpt_00000006.pt"]
    capsys.readouterr()


def _trainer_of(argv, monkeypatch, capsys):
    """The Trainer that `train` builds for argv, before its first step (run() is not called)."""
    built = []
    monkeypatch.setattr(ddpm.Trainer, "run", lambda self: built.append(self) or 0)
    code, err = run_main(argv, capsys)
    assert code == 0, err
    return built[0], err


def test_init_starts_from_the_ema_weights_of_a_checkpoint_or_an_export_with_all_else_new(ckpts, folder, tmp_path,
                                                                                         monkeypatch, capsys):
    exported = str(tmp_path / "m.pt")
    ddpm.export_model(ckpts["cond"], exported)
    source = torch.load(ckpts["cond"], weights_only=True)
    run = ["train", "--data", folder, "--batch-size", "4", "--sample-every", "0", "--num-workers", "1", "--seed", "3"]
    for init, exact in [(ckpts["cond"], True), (exported, False)]:
        t, _ = _trainer_of([*run, "--init", init, "--out", str(tmp_path / ("run_" + os.path.basename(init)))],
                           monkeypatch, capsys)
        for k, v in t.model.state_dict().items():  # the source's EMA weights (exported: in fp16), in model and EMA
            want = source["ema"]["model"][k]
            assert torch.equal(v, want) if exact else torch.allclose(v, want, rtol=1e-3, atol=1e-4), k
            assert torch.equal(t.ema.model.state_dict()[k], v), k
        assert t.step == 0 and t.ema.num_updates == 0 and not t.opt.state  # a new step, EMA count and Adam
        assert (t.cfg["ch"], tuple(t.cfg["ch_mult"]), t.cfg["timesteps"], t.cfg["image_size"]) == (16, (1, 2), 50, 16)
        assert t.cfg["init"] == init and t.cfg["seed"] == 3  # saved in the config; the seed is this run's
    # a run from --init resumes exactly: 2 steps straight equal 1 step, then a resume to 2
    base = [*run, "--init", exported, "--dropout", "0.3"]
    monkeypatch.undo()
    assert ddpm.main([*base, "--steps", "2", "--out", str(tmp_path / "straight")]) == 0
    assert ddpm.main([*base, "--steps", "1", "--out", str(tmp_path / "resumed")]) == 0
    assert ddpm.main(["train", "--resume", "--out", str(tmp_path / "resumed"), "--steps", "2"]) == 0
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("straight", "resumed"))
    assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())
    assert dict(a["config"], out=None) == dict(b["config"], out=None) and a["config"]["init"] == exported
    capsys.readouterr()


def test_init_on_other_classes_starts_the_class_embedding_anew_but_keeps_the_null_label(ckpts, tmp_path, monkeypatch,
                                                                                     capsys):
    g = torch.Generator().manual_seed(0)
    for c in ["a", "b", "c"]:  # three classes, not the source's cat and ship
        os.makedirs(tmp_path / "abc" / c)
        for i in range(2):
            Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()).save(
                tmp_path / "abc" / c / f"{i}.png")
    run = ["train", "--data", str(tmp_path / "abc"), "--batch-size", "4", "--sample-every", "0", "--num-workers", "1"]
    source = torch.load(ckpts["cond"], weights_only=True)["ema"]["model"]
    t, err = _trainer_of([*run, "--init", ckpts["cond"], "--out", str(tmp_path / "i")], monkeypatch, capsys)
    new, _ = _trainer_of([*run, *TINY, "--out", str(tmp_path / "n")], monkeypatch, capsys)  # the same net, no --init
    emb = t.model.class_emb.weight.detach()
    assert emb.shape == (4, 64) and "starts anew" in err
    assert torch.equal(emb[-1], source["class_emb.weight"][-1])  # the null label's row is the source's
    assert torch.equal(emb[:-1], new.model.class_emb.weight.detach()[:-1])  # the rest: a new network's rows
    assert all(torch.equal(v, source[k]) for k, v in t.model.state_dict().items() if k != "class_emb.weight")


def test_a_checkpoint_of_the_one_process_release_resumes(folder, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert ddpm.main(["train", "--data", folder, "--out", out, "--steps", "2", *TINY]) == 0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    ckpt["rng"] = ckpt["rng"]["ranks"][0]            # as saved before multi-process training: {"cpu", "cuda"}
    torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    assert ddpm.main(["train", "--resume", "--out", out, "--steps", "3"]) == 0
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 3
    capsys.readouterr()


def test_existing_run_is_never_overwritten_without_resume(ckpts, folder, capsys):
    before = open(ckpts["cond"], "rb").read()
    out = os.path.dirname(ckpts["cond"])
    code, err = run_main(["train", "--data", folder, "--out", out, "--steps", "3", *TINY], capsys)
    assert code == 2 and "--resume" in err and open(ckpts["cond"], "rb").read() == before


def _poison_loss(monkeypatch, at_call, factor):
    """Diffusion.training_loss multiplied by `factor` (nan, inf) at its at_call-th call → the list of its calls."""
    real, calls = ddpm.Diffusion.training_loss, []

    def poisoned(self, *a, **k):
        calls.append(1)
        loss = real(self, *a, **k)
        return loss * factor if len(calls) == at_call else loss
    monkeypatch.setattr(ddpm.Diffusion, "training_loss", poisoned)
    return calls


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path, monkeypatch, capsys):
    _poison_loss(monkeypatch, 3, float("nan"))
    code, err = run_main(["train", "--data", folder, "--out", str(tmp_path), "--steps", "5", "--save-every", "1",
                          *TINY], capsys)
    assert code == 1 and "at step 3" in err and "Traceback" not in err
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values())


def test_non_finite_loss_found_at_a_log_line_names_its_step_and_saves_nothing(folder, tmp_path, monkeypatch, capsys):
    """The check waits for the log line (no host sync per step), yet names the step where the loss went bad."""
    calls = _poison_loss(monkeypatch, 3, float("inf"))
    code, err = run_main(["train", "--data", folder, "--out", str(tmp_path), "--steps", "9", "--log-every", "5", *TINY],
                         capsys)
    assert code == 1 and "at step 3;" in err and len(calls) == 5 and not os.path.exists(tmp_path / "ckpt.pt")


def test_padded_batches_yield_exactly_n_samples():
    model = randomize(ddpm.UNet(3, 16, (1,), 1, (), 0.0, 8, num_classes=3))
    labels = torch.tensor([0, 1, 2, 0, 1])
    for pad in (False, True):
        batches = list(ddpm.sample_batches(model, ddpm.Diffusion(20), 5, 2, pad, y=labels, steps=3))
        assert [len(b) for b in batches] == [2, 2, 1] and all(b.shape[1:] == (3, 8, 8) for b in batches)


def test_the_batched_loop_slices_per_image_tensors_also_in_a_tuple_and_pads_the_last_batch():
    """sample_batches: noise and inpainting's (x_known, mask) are sliced along the batches, the last one padded (a
    compiled model's one shape): sliced noise gives one batch's samples, a sliced mask each row's own known pixels."""
    model = randomize(ddpm.UNet(3, 16, (1,), 1, (), 0.0, 8, num_classes=3))
    d = ddpm.Diffusion(20)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(5, 3, 8, 8, generator=g)
    x_known = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1
    mask = (torch.rand(5, 1, 8, 8, generator=g) > 0.5).float().expand(5, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 0, 1])
    whole = d.sample(model, 5, y, 2.0, steps=4, noise=noise)  # DDIM, η = 0: a function of the noise
    for pad in (False, True):
        batches = list(ddpm.sample_batches(model, d, 5, 2, pad, y=y, guidance=2.0, steps=4, noise=noise))
        assert [len(b) for b in batches] == [2, 2, 1] and torch.allclose(torch.cat(batches), whole, atol=1e-5)
        x = torch.cat(list(ddpm.sample_batches(model, d, 5, 2, pad, y=y, guidance=2.0, steps=4, noise=noise,
                                               known=(x_known, mask))))  # each batch pastes its own rows
        assert torch.equal(x[mask > 0], x_known[mask > 0]) and not torch.allclose(x, whole, atol=1e-3)


def four_images(size=8):
    """Four size×size images with distinct colours and shapes; pairwise MSE ≥ 0.85."""
    data = torch.full((4, 3, size, size), -0.8)
    data[0, 0], data[1, 1, :size // 2], data[2, 2, :, :size // 2], data[3] = 0.8, 0.8, 0.8, 0.5
    return data


def nearest_mse(x, data):
    """For each sample, the MSE to the closest data image and that image's index."""
    return ((x[:, None] - data[None]) ** 2).mean(dim=(2, 3, 4)).min(dim=1)


@pytest.mark.parametrize("steps", [None, 20])
def test_samplers_draw_exact_training_points_under_the_mixture_oracle(steps):
    # The exact ε for data = four points: x̂_0 is their posterior mean given x_t,
    # ε = (x_t − sqrt(ᾱ_t) x̂_0)/sqrt(1 − ᾱ_t).
    d, data = ddpm.Diffusion(100), four_images()

    class Mixture(Oracle):
        def forward(self, x, t, y=None):
            a = d.alphas_cumprod[t].view(-1, 1, 1, 1)
            logp = -((x[:, None] - a.sqrt()[:, None] * data[None]) ** 2).sum(dim=(2, 3, 4)) / (2 * (1 - a.view(-1, 1)))
            x0 = (logp.softmax(1)[:, :, None, None, None] * data[None]).sum(1)
            return (x - a.sqrt() * x0) / (1 - a).sqrt()
    x = d.sample(Mixture(d, data[:1]), 16, steps=steps, generator=torch.Generator().manual_seed(0))
    nearest = nearest_mse(x, data)
    assert nearest.values.max() < 1e-6 and len(set(nearest.indices.tolist())) >= 3


def test_overfit_tiny_model_reproduces_its_training_images():
    torch.manual_seed(0)
    data, d = four_images(), ddpm.Diffusion(100)
    model = ddpm.UNet(3, 32, (1,), 1, (), 0.0, 8)
    ema = ddpm.EMA(model, 0.99)
    untrained = nearest_mse(d.sample(ema.model, 16, steps=20, generator=torch.Generator().manual_seed(0)), data)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(200):
        loss = d.training_loss(model, data.repeat(8, 1, 1, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first / 10, (first, last)                         # measured: 0.40 → 0.028
    nearest = nearest_mse(d.sample(ema.model, 16, steps=20, generator=torch.Generator().manual_seed(0)), data)
    # Measured median 0.08 (untrained: 1.25): samples sit ~10× closer to one training image than those
    # images are to each other (≥ 0.85), and they are not collapsed onto one image.
    assert nearest.values.median() < 0.15 < untrained.values.median(), (nearest.values, untrained.values)
    assert len(set(nearest.indices.tolist())) >= 3


# ---------------------------------------------------------------------------------------------- command line
def test_sample_cli_writes_grids_and_per_image_files(ckpts, tmp_path, capsys):
    grid = str(tmp_path / "ship.png")
    assert ddpm.main(["sample", "--ckpt", ckpts["cond"], "--class", "ship", "--n", "4", "--steps", "5",
                      "--out", grid]) == 0
    assert Image.open(grid).size == (2 * 17 + 1, 2 * 17 + 1)                # 2×2 grid of 16-px images, 1-px padding
    assert ddpm.main(["sample", "--ckpt", ckpts["cond"], "--n", "4", "--steps", "3",
                      "--out", str(tmp_path / "all.png")]) == 0
    assert Image.open(tmp_path / "all.png").size == (2 * 17 + 1, 2 * 17 + 1)   # one row per class, 2 per row
    assert ddpm.main(["sample", "--ckpt", ckpts["uncond"], "--n", "3", "--steps", "2", "--batch-size", "2",
                      "--out", str(tmp_path / "each") + "/"]) == 0
    assert sorted(os.listdir(tmp_path / "each")) == ["000000.png", "000001.png", "000002.png"]
    capsys.readouterr()


def test_every_command_has_help(capsys):
    # ddpm.py itself runs as a script in test_sigterm_to_torchrun_stops_every_process_after_the_same_step
    with pytest.raises(SystemExit) as exit:
        ddpm.main(["--help"])
    commands = "{train,sample,inpaint,interpolate,img2img,fid,nll,export,forward}"  # in the README's order
    assert exit.value.code == 0 and commands in capsys.readouterr().out
    for command in ("train", "sample", "inpaint", "interpolate", "img2img", "fid", "nll", "export", "forward"):
        with pytest.raises(SystemExit) as exit:
            ddpm.main([command, "--help"])
        assert exit.value.code == 0 and f"usage: ddpm.py {command}" in capsys.readouterr().out


def test_mixed_image_modes_are_converted(tmp_path):
    for i, mode in enumerate(["L", "RGBA", "P", "RGB", "I;16"]):
        os.makedirs(tmp_path / "c", exist_ok=True)
        Image.new(mode, (20, 12)).save(tmp_path / "c" / f"{i}.png")
    images, labels, classes = ddpm.load_images(str(tmp_path), image_size=8, workers=1)
    assert images.shape == (5, 3, 8, 8) and images.dtype == torch.uint8 and classes == ["c"]


def test_a_folder_is_decoded_once_into_a_cache_keyed_by_what_made_it(folder, tmp_path, monkeypatch):
    shutil.copytree(folder, tmp_path / "imgs")
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "root"))
    data, root, opened = str(tmp_path / "imgs"), str(tmp_path / "root"), []
    real_open = ddpm.Image.open
    monkeypatch.setattr(ddpm.Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    load = lambda size=16, d=data: (ddpm.load_images(d, root, size, 1, cache=True), len(opened))
    (first, labels, classes), n = load()
    cached = glob.glob(os.path.join(root, "images", "images-*.npy"))
    assert n == 6 and len(cached) == 1
    (again, labels2, classes2), n = load()
    assert n == 6 and torch.equal(again, first) and torch.equal(labels2, labels) and classes2 == classes  # mapped
    assert load(8)[1] == 12 and len(glob.glob(os.path.join(root, "images", "*.npy"))) == 2  # another size: its own
    shutil.copytree(data, tmp_path / "twin")  # the same files in another folder: its own cache too
    assert load(16, str(tmp_path / "twin"))[1] == 18 and len(glob.glob(os.path.join(root, "images", "*.npy"))) == 3
    some = os.path.join(data, "cat", sorted(os.listdir(os.path.join(data, "cat")))[0])
    os.utime(some, ns=(1, 1))  # a file changed (its time): decoded anew
    assert load()[1] == 24 and len(glob.glob(os.path.join(root, "images", "*.npy"))) == 4
    with open(cached[0], "r+b") as f:  # a damaged cache: decoded anew and rewritten whole, never half-read
        f.truncate(os.path.getsize(cached[0]) // 2)
    shutil.rmtree(tmp_path / "imgs")
    shutil.copytree(folder, tmp_path / "imgs")  # the first files again (copytree keeps their times): the first key
    opened.clear()
    (x, _, _), n = load()
    assert torch.equal(x, first) and n == 6 and os.path.getsize(cached[0]) > x.numel()
    assert torch.equal(load()[0][0], first) and len(opened) == 6  # whole again: mapped, not decoded


def test_pick_decodes_only_the_chosen_images(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "d")
    full, labels, classes = ddpm.load_images(str(tmp_path / "d"), image_size=16)
    (tmp_path / "d" / "cat" / "0.jpg").write_bytes(b"not a picture")   # file 0 in sorted order: never opened
    picked, picked_labels, picked_classes = ddpm.load_images(str(tmp_path / "d"), image_size=16,
                                                             pick=lambda n: torch.tensor([5, 1, 3]) % n)
    assert torch.equal(picked, full[[5, 1, 3]]) and torch.equal(picked_labels, labels[[5, 1, 3]])
    assert picked_classes == classes == ["cat", "ship"]


def test_cifar10_path_converts_torchvision_data(monkeypatch):
    import numpy as np
    import torchvision

    class FakeCIFAR10:  # what torchvision.datasets.CIFAR10 exposes once downloaded: HWC uint8, int targets
        def __init__(self, root, train, download):
            assert train and download and root == "somewhere"
            self.data = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
            self.targets, self.classes = [8, 0], list(CIFAR10_CLASSES)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    images, labels, classes = ddpm.load_images("cifar10", "somewhere", 32)
    assert images.shape == (2, 3, 32, 32)
    assert torch.equal(images[1, 2], torch.from_numpy(FakeCIFAR10("somewhere", 1, 1).data[1, :, :, 2]))
    assert labels.tolist() == [8, 0] and classes[8] == "ship"
    assert ddpm.load_images("cifar10", "somewhere", 16)[0].shape == (2, 3, 16, 16)
    picked, labels, _ = ddpm.load_images("cifar10", "somewhere", 32, pick=lambda n: torch.tensor([1]))
    assert torch.equal(picked, images[1:]) and labels.tolist() == [0]
    # A folder copy of CIFAR-10 sorts its class folders alphabetically: the same indices as torchvision's labels.
    assert list(CIFAR10_CLASSES) == sorted(CIFAR10_CLASSES)


def _bad_inputs(ckpts, folder, tmp):
    os.makedirs(tmp / "empty" / "cls")
    os.makedirs(tmp / "broken" / "cls")
    (tmp / "broken" / "cls" / "x.png").write_bytes(b"\x89PNG garbage")
    (tmp / "afile").write_text("")
    c, u = ckpts["cond"], ckpts["uncond"]
    os.makedirs(tmp / "exported")
    ddpm.export_model(c, str(tmp / "exported" / "ckpt.pt"))
    train = ["train", "--out", str(tmp / "run"), *TINY]
    return {
        "resume of an exported model": (["train", "--resume", "--out", str(tmp / "exported")],
                                        "is an exported model (EMA weights only: no optimizer, no random states): it "
                                        "cannot resume a run; fine-tune from it with train --init"),
        "unknown class": (["sample", "--ckpt", c, "--class", "dog"], "choose from cat, ship"),
        "class index out of range": (["sample", "--ckpt", c, "--class", "2"], "choose from"),
        "class on unconditional": (["sample", "--ckpt", u, "--class", "cat"], "unconditional"),
        "missing checkpoint": (["sample", "--ckpt", str(tmp / "nope.pt")], "not found"),
        "steps above T": (["sample", "--ckpt", c, "--steps", "51"], "T = 50"),
        "unwritable sample --out": (["sample", "--ckpt", c, "--steps", "2", "--out", str(tmp / "afile" / "x.png")],
                                    "cannot write"),
        "n = 0": (["sample", "--ckpt", c, "--n", "0"], "--n"),
        "sample steps = 0": (["sample", "--ckpt", c, "--steps", "0"], "--steps"),
        "negative guidance": (["sample", "--ckpt", c, "--guidance", "-1"], "--guidance"),
        "eta above 1": (["sample", "--ckpt", c, "--eta", "1.5"], "--eta"),
        "sample batch 0": (["sample", "--ckpt", c, "--batch-size", "0"], "--batch-size"),
        "ancestral with steps": (["sample", "--ckpt", c, "--sampler", "ancestral", "--steps", "5"], "all T steps"),
        "eta for dpm++": (["sample", "--ckpt", c, "--sampler", "dpm++", "--eta", "0.5"], "only --sampler ddim"),
        "unknown spacing": (["sample", "--ckpt", c, "--spacing", "cubic"], "--spacing"),
        "unknown device": (["sample", "--ckpt", c, "--device", "tpu9"], "--device"),
        "missing folder": ([*train, "--data", str(tmp / "nowhere")], "no such folder"),
        "empty folder": ([*train, "--data", str(tmp / "empty")], "no images"),
        "unreadable image": ([*train, "--data", str(tmp / "broken")], "cannot read image"),
        "indivisible image size": ([*train, "--data", folder, "--image-size", "18", "--ch-mult", "1,2,2"],
                                   "each side must be a multiple of 4; the nearest: 16 or 20 by 16 or 20"),
        "indivisible side": ([*train, "--data", folder, "--image-size", "16,30", "--ch-mult", "1,2,2"],
                             "--image-size 16,30: a U-Net of 3 levels halves it 2 times, so each side must be a "
                             "multiple of 4; the nearest: 16 by 28 or 32"),
        "three sides": ([*train, "--data", folder, "--image-size", "16,16,16"], "a side, or height,width"),
        "unwritable train --out": (["train", "--data", folder, "--out", str(tmp / "afile" / "run")], "cannot write"),
        "resume without a run": (["train", "--resume", "--out", str(tmp / "none")], "no checkpoint"),
        "train steps = 0": ([*train, "--steps", "0"], "--steps"),
        "batch size 0": ([*train, "--batch-size", "0"], "--batch-size"),
        "lr = 0": ([*train, "--lr", "0"], "--lr"),
        "lr = nan": ([*train, "--lr", "nan"], "--lr"),
        "absurd lr": ([*train, "--lr", "5"], "--lr"),
        "timesteps = 0": ([*train, "--timesteps", "0"], "--timesteps"),
        "bad schedule": ([*train, "--schedule", "quadratic"], "--schedule"),
        "bad ch-mult": ([*train, "--ch-mult", "1,x"], "--ch-mult"),
        "zero ch-mult": ([*train, "--ch-mult", "1,0"], "--ch-mult"),
        "changed architecture on resume": (["train", "--resume", "--out", os.path.dirname(c), "--ch", "32"], "--ch 32"),
        "changed loss on resume": (["train", "--resume", "--out", os.path.dirname(c), "--loss", "l1"],
                                   "--loss l1: the run in"),
        "unknown loss": ([*train, "--data", folder, "--loss", "l3"], "--loss"),
        "unknown tracker": ([*train, "--data", folder, "--report-to", "tensorboard,mlflow"], "choose from tensorboard"),
        "micro-batch not dividing the batch": ([*train, "--data", folder, "--micro-batch", "3"], "micro-batches of 3"),
        "missing --init": ([*train, "--data", folder, "--init", str(tmp / "nope.pt")], "not found"),
        "--init and another network": ([*train, "--data", folder, "--init", c, "--ch", "32"], "comes from --init"),
        "--init at a size its attention misses": ([*train, "--data", folder, "--init", c, "--image-size", "32"],
                                                  "do not fit"),
        "unknown flag": ([*train, "--bogus"], "unrecognized"),
        "forward --n over the folder": (["forward", "--data", folder, "--n", "7", "--out", str(tmp / "f.png")],
                                        "--n 7: the data has only 6 images"),
    }


def test_every_bad_input_is_one_line_and_exit_2(ckpts, folder, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = _bad_inputs(ckpts, folder, tmp_path)
    cases["no checkpoint in runs/"] = (["sample"], "train one first")
    monkeypatch.setattr(ddpm, "__file__", str(tmp_path / "ddpm.py"))  # and no bundled samples/cifar10_small.pt
    for name, (argv, needle) in cases.items():
        code, err = run_main(argv, capsys)
        assert code == 2, (name, code, err)
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err, (name, err)
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt") and not os.path.exists(tmp_path / "samples")


def test_out_of_memory_suggests_a_smaller_batch(ckpts, tmp_path, monkeypatch, capsys):
    existing = tmp_path / "keep.png"
    existing.write_bytes(b"old")

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(ddpm.Diffusion, "sample", oom)
    code, err = run_main(["sample", "--ckpt", ckpts["cond"], "--out", str(existing)], capsys)
    assert code == 2 and "smaller --batch-size" in err and existing.read_bytes() == b"old"


# ---------------------------------------------------------------------------------------------- signals (subprocesses)
def _main_in_child(argv, err):
    with open(err, "w", buffering=1) as f:  # stderr into a file the test reads
        sys.stderr = f
        os.dup2(f.fileno(), 2)
        torch.set_num_threads(1)  # OpenMP's threads do not survive a fork
        sys.exit(ddpm.main(argv))


def _start_training(folder, out, *extra):
    """`train` in a process of its own, forked from this one (no new interpreter to start): signals from outside, as
    a user's kill sends them, reach it while it trains; its stderr goes to out + ".err"."""
    argv = ["train", "--data", folder, "--out", out, "--steps", "100000", "--log-every", "1", *TINY, *extra]
    proc = multiprocessing.get_context("fork").Process(target=_main_in_child, args=(argv, out + ".err"))
    proc.start()
    return proc


def _wait_for(path, alive, timeout=60):
    end = time.time() + timeout
    while not (os.path.exists(path) and os.path.getsize(path) > 0):
        assert alive() and time.time() < end, "exited" if not alive() else "timeout"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(folder, tmp_path, sig):
    out = str(tmp_path / "run")
    proc = _start_training(folder, out, "--save-every", "100000")
    _wait_for(os.path.join(out, "log.txt"), proc.is_alive)
    os.kill(proc.pid, sig)
    proc.join(60)
    err = open(out + ".err").read()
    assert proc.exitcode == 128 + sig, err
    assert "Resume with: python ddpm.py train --resume --out" in err and "Traceback" not in err
    step = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    assert f"interrupted at step {step};" in err and step >= 1


def _snapshot(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def test_a_run_holds_its_folder_until_it_dies_even_by_sigkill_and_leaves_a_loadable_checkpoint(folder, tmp_path,
                                                                                               capsys):
    out = str(tmp_path / "run")
    proc = _start_training(folder, out, "--save-every", "1")
    _wait_for(os.path.join(out, "ckpt.pt"), proc.is_alive)
    time.sleep(0.5)                                                 # several more saves, one likely in flight
    os.kill(proc.pid, signal.SIGSTOP)  # frozen, perhaps mid-save: its folder must stay exactly as it is now
    try:
        before = _snapshot(out)
        for extra in ([], ["--resume"], ["--resume", "--steps", "200000"], ["--seed", "1", "--steps", "3"]):
            argv = ["train", "--out", out, *extra] if "--resume" in extra else \
                ["train", "--data", folder, "--out", out, *TINY, *extra]
            code, err = run_main(argv, capsys)
            assert code == 2 and err.count("\n") == 1 and f"in use by another train, process {proc.pid}" in err, err
        assert _snapshot(out) == before
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    proc.kill()
    proc.join(60)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["step"] >= 1 and all(v.isfinite().all() for v in ckpt["model"].values())
    code, err = run_main(["train", "--resume", "--out", out, "--steps", str(ckpt["step"] + 1)], capsys)  # no stale lock
    assert code == 0 and not any(".tmp" in f for f in os.listdir(out)), err


def test_where_files_cannot_be_locked_a_run_says_so_once_and_goes_on(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows
    code, err = run_main(["train", "--data", folder, "--out", str(tmp_path / "run"), "--steps", "1", *TINY], capsys)
    assert code == 0 and err.count("note: no file locks on this platform: keep a second run out of") == 1


# ---------------------------------------------------------------------------------------------- several processes (DDP)
def _ddp_process(rank, world, port, argv):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.exit(ddpm.main(argv))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(argv, world=2):
    """ddpm.main(argv) in `world` forked processes that meet over gloo on 127.0.0.1, as torchrun would start them."""
    port = _free_port()
    procs = [multiprocessing.get_context("fork").Process(target=_ddp_process, args=(r, world, port, argv))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return [p.exitcode for p in procs]


def test_two_processes_take_the_same_step_as_one(folder, tmp_path, capsys):
    args = ["train", "--data", folder, "--steps", "1", "--dropout", "0", "--warmup", "0", "--p-uncond", "0.5", *TINY]
    assert ddpm.main(args + ["--out", str(tmp_path / "one")]) == 0
    report = ["--report-to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    # and with activation checkpointing under DDP: the same step (it changes memory, not results)
    assert run_ddp(args + ["--out", str(tmp_path / "two"), *report, "--grad-checkpoint"]) == [0, 0]
    assert len(glob.glob(str(tmp_path / "two" / "tensorboard" / "*"))) == len(report) // 2  # rank 0's events only
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("one", "two"))
    for key, value in a["model"].items():
        assert torch.allclose(b["model"][key], value, rtol=1e-5, atol=1e-8), key
    for i, state in a["optimizer"]["state"].items():   # Adam's first moment is 0.1 × the (averaged) gradient
        grad_a, grad_b = state["exp_avg"], b["optimizer"]["state"][i]["exp_avg"]
        assert (grad_a - grad_b).norm() <= 1e-5 * grad_a.norm() + 1e-12, i
    capsys.readouterr()


def test_micro_batches_accumulate_the_gradient_of_the_whole_batch_in_one_process_and_in_two(folder, tmp_path, capsys):
    args = ["train", "--data", folder, "--steps", "1", "--dropout", "0", "--warmup", "0", "--p-uncond", "0.5", *TINY]
    assert ddpm.main(args + ["--out", str(tmp_path / "whole")]) == 0                          # batch 4 at once
    assert ddpm.main(args + ["--micro-batch", "1", "--out", str(tmp_path / "micro")]) == 0    # 4 parts of 1
    assert run_ddp(args + ["--micro-batch", "1", "--out", str(tmp_path / "two")]) == [0, 0]   # 2 processes × 2 parts
    runs = [torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("whole", "micro", "two")]
    logs = [re.search(r"loss (\S+)", (tmp_path / r / "log.txt").read_text())[1] for r in ("whole", "micro", "two")]
    for other in runs[1:]:
        for i, state in runs[0]["optimizer"]["state"].items():  # Adam's first moment: 0.1 × the gradient
            grad, got = state["exp_avg"], other["optimizer"]["state"][i]["exp_avg"]
            assert (grad - got).norm() <= 1e-5 * grad.norm() + 1e-12, i
        assert all(torch.allclose(other["model"][k], v, rtol=1e-5, atol=1e-8) for k, v in runs[0]["model"].items())
    assert logs[0] == logs[1] == logs[2]  # the loss of the whole batch, to the 5 digits logged
    capsys.readouterr()


def test_two_process_resume_is_bitwise_identical(folder, tmp_path, capsys):
    args = ["train", "--data", folder, "--dropout", "0.3", "--p-uncond", "0.5", *TINY]   # 2 images a process
    assert run_ddp(args + ["--steps", "4", "--out", str(tmp_path / "straight")]) == [0, 0]
    assert run_ddp(args + ["--steps", "2", "--out", str(tmp_path / "resumed")]) == [0, 0]
    assert run_ddp(["train", "--resume", "--out", str(tmp_path / "resumed"), "--steps", "4"]) == [0, 0]
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("straight", "resumed"))
    assert a["step"] == b["step"] == 4 and len(a["rng"]["ranks"]) == 2
    for part in ("model", "optimizer", "ema"):
        flat_a, flat_b = torch.utils._pytree.tree_flatten(a[part])[0], torch.utils._pytree.tree_flatten(b[part])[0]
        assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(flat_a, flat_b)), part
    capsys.readouterr()


def test_a_global_batch_that_does_not_split_is_one_line(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, err = run_main(["train", "--data", folder, "--out", str(tmp_path / "run"), *TINY], capsys)
    assert code == 2 and "--batch-size 4 (the global batch) does not split over 3 processes" in err
    assert err.count("\n") == 1 and not os.path.exists(tmp_path / "run" / "ckpt.pt")


def _children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1] == str(pid):
                kids.append(int(entry))
        except OSError:
            pass
    return kids


def test_sigterm_to_torchrun_stops_every_process_after_the_same_step(folder, tmp_path):
    """ddpm.py as torchrun runs it: as a script, in two processes."""
    out, root = str(tmp_path / "run"), str(tmp_path / "root")
    ddpm.load_images(folder, root, 16, cache=True)  # decoded once here: the workers map it (no torchvision import)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen([*torchrun, os.path.join(HERE, "ddpm.py"), "train", "--data", folder, "--out", out,
                             "--steps", "100000", "--save-every", "1", "--log-every", "100000", "--data-root", root,
                             *TINY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TMPDIR=str(tmp_path)))  # torchrun's own folder, which a signal leaves
    _wait_for(os.path.join(out, "ckpt.pt"), lambda: proc.poll() is None)  # training: its first step is saved
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert f"interrupted at step {ckpt['step']}; saved" in err and err.count("interrupted at step") == 1, err
    assert len(ckpt["rng"]["ranks"]) == 2 and len(workers) == 2 and not _children(proc.pid)
    assert all(not os.path.exists(f"/proc/{w}") for w in workers) and not any(".tmp" in f for f in os.listdir(out))


def test_a_process_that_dies_takes_the_others_down(folder, tmp_path):
    """No hang: the survivor's next collective fails at once (torchrun then also ends the rest and reports)."""
    out, port = str(tmp_path / "run"), _free_port()
    argv = ["train", "--data", folder, "--out", out, "--steps", "100000", "--log-every", "1", *TINY]
    procs = [multiprocessing.get_context("fork").Process(target=_ddp_process, args=(r, 2, port, argv)) for r in (0, 1)]
    for p in procs:
        p.start()
    end = time.time() + 60
    while not os.path.exists(os.path.join(out, "log.txt")) and time.time() < end:
        time.sleep(0.05)
    assert os.path.exists(os.path.join(out, "log.txt")) and all(p.is_alive() for p in procs)   # both are training
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[0].join(30)
    assert procs[0].exitcode not in (None, 0) and procs[1].exitcode == -signal.SIGKILL


# ---------------------------------------------------------------------------------------------- pictures of the process
@pytest.mark.parametrize("steps,expected_t", [(None, [99, 88, 77, 66, 55, 44, 33, 22, 11, 0]),   # 100 steps, every 11th
                                              (12, [99, 90, 81, 63, 54, 45, 36, 18, 9, 0])])    # 10 of DDIM's 12
def test_reverse_process_frames_run_from_the_start_noise_to_the_returned_sample(steps, expected_t):
    d, x_star = ddpm.Diffusion(100), torch.rand(1, 3, 8, 8) * 2 - 1
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x, frames = ddpm.reverse_process(Oracle(d, x_star), d, 2, steps=steps, noise=noise,
                                     generator=torch.Generator().manual_seed(1))
    assert [t for t, _, _ in frames] == expected_t
    assert torch.equal(frames[0][1], noise) and torch.equal(frames[-1][2], x)   # x_{T−1} … the sample itself
    for t, x_t, x0 in frames:  # the oracle's data is the one point x*: every x̂_0 is x*, from any x_t
        assert torch.allclose(x0, x_star.expand_as(x0), atol=1e-3), t


def test_sample_process_writes_a_looping_gif_and_a_strip_grey_for_grey_data(tmp_path, capsys):
    ckpt = grey_run(tmp_path)
    for steps, frames in [("all", 10), ("5", 5)]:  # T = 50 ancestral steps: 10 frames; 5 DDIM steps: all 5
        out = tmp_path / f"p{steps}.png"
        code, err = run_main(["sample", "--ckpt", ckpt, "--n", "3", "--steps", steps, "--process", "--out", str(out)],
                             capsys)
        gif = Image.open(out.with_suffix(".gif"))
        assert code == 0 and gif.n_frames == frames and gif.info["loop"] == 0
        durations = []
        for k in range(frames):
            gif.seek(k)
            durations.append(gif.info["duration"])
            r, g, b = gif.convert("RGB").split()
            assert r.tobytes() == g.tobytes() == b.tobytes()                                    # grey frames
        assert durations[-1] > 2 * max(durations[:-1])                                          # the end is held
        strip = Image.open(out)  # 2 rows a sample × `frames` columns of 16-px tiles, 2-px gaps, doubled; labels
        assert strip.mode == "L" and strip.size == (48 + 2 * (frames * 18 + 2), 2 * (6 * 18 + 2) + 14)
    code, err = run_main(["sample", "--ckpt", ckpt, "--n", "1", "--steps", "2", "--process",
                          "--out", str(tmp_path) + "/"],
                         capsys)  # into a folder: named as a grid would be, all.gif and all.png
    assert code == 0 and os.path.exists(tmp_path / "all.gif") and os.path.exists(tmp_path / "all.png")


def test_forward_process_rows_follow_eq_4_with_one_eps_a_row():
    x0 = torch.linspace(-1, 1, 2 * 3 * 16 * 16).view(2, 3, 16, 16)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    rows, ts = ddpm.forward_process(x0, noise, [ddpm.Diffusion(1000, "linear"), ddpm.Diffusion(1000, "cosine")])
    assert ts == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999] and len(rows) == 4 and len(rows[0]) == 10
    betas = {"linear": torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)}
    for i, (x, eps) in enumerate(zip(x0, noise)):
        for k, schedule in enumerate(("linear", "cosine")):
            row = rows[2 * i + k]
            assert (row[0] - x).abs().mean() < 0.01
            assert torch.corrcoef(torch.stack([row[0].flatten(), x.flatten()]))[0, 1] > 0.999
            assert torch.corrcoef(torch.stack([row[-1].flatten(), x.flatten()]))[0, 1].abs() < 0.1   # noise at T − 1
            if schedule in betas:  # Eq. 4 from an independent ᾱ: the same ε in every column of the row
                a = torch.cumprod(1 - betas[schedule], 0)[ts].float().view(-1, 1, 1, 1)
                assert torch.allclose(torch.stack(row), a.sqrt() * x + (1 - a).sqrt() * eps, atol=1e-5)


def test_forward_cli_writes_a_labelled_strip_of_both_schedules(folder, tmp_path, capsys):
    code, err = run_main(["forward", "--data", folder, "--image-size", "16", "--n", "2", "--out",
                          str(tmp_path / "f.png")], capsys)
    strip = Image.open(tmp_path / "f.png")  # 2 images × 2 schedules = 4 rows, 10 columns; 2-px gaps, doubled; labels
    assert code == 0 and strip.mode == "RGB" and strip.size == (48 + 2 * (10 * 18 + 2), 2 * (4 * 18 + 2) + 14)
    grey_run(tmp_path)
    code, err = run_main(["forward", "--data", str(tmp_path / "grey"), "--n", "1", "--out", str(tmp_path / "g.png")],
                         capsys)
    assert code == 0 and Image.open(tmp_path / "g.png").mode == "L" and "t = [0, 111" in err
    assert Image.open(tmp_path / "g_schedule.png").size == (640, 320)  # the numbers behind it, beside it


def test_sample_names_the_precision_it_used_and_auto_follows_what_pytorch_reports(ckpts, tmp_path, monkeypatch,
                                                                                 capsys):
    out = ["--ckpt", ckpts["cond"], "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png")]
    for precision in ("fp32", "bf16"):
        code, err = run_main(["sample", *out, "--precision", precision], capsys)
        assert code == 0 and f"guidance 2.0, {precision}) from" in err
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # a Zen 4, as PyTorch reports it
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    code, err = run_main(["sample", *out], capsys)
    assert code == 0 and "guidance 2.0, bf16) from" in err
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    code, err = run_main(["sample", *out], capsys)
    assert code == 0 and "guidance 2.0, fp32) from" in err


def test_sample_writes_into_outputs_not_into_the_repos_samples(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["sample", "--ckpt", ckpts["cond"], "--class", "cat", "--n", "1", "--steps", "1"], capsys)
    assert code == 0 and os.listdir(tmp_path) == ["outputs"] and os.listdir(tmp_path / "outputs") == ["cat.png"]
    code, err = run_main(["sample", "--ckpt", ckpts["cond"], "--class", "1", "--n", "1", "--steps", "1"], capsys)
    assert code == 0 and sorted(os.listdir(tmp_path / "outputs")) == ["cat.png", "ship.png"]  # a class by its index


# ---------------------------------------------------------------------------------------------- flips and image size
def test_flips_are_a_saved_setting_that_a_resume_keeps(tmp_path, monkeypatch, capsys):
    (tmp_path / "d" / "a").mkdir(parents=True)
    image = torch.arange(16 * 16 * 3).view(16, 16, 3).to(torch.uint8)   # no mirror symmetry anywhere
    Image.fromarray(image.numpy()).save(tmp_path / "d" / "a" / "0.png")
    seen, real = [], ddpm.Diffusion.training_loss
    monkeypatch.setattr(ddpm.Diffusion, "training_loss",
                        lambda self, m, x0, *a, **k: seen.append(x0) or real(self, m, x0, *a, **k))
    x = image.permute(2, 0, 1).float() / 127.5 - 1
    mirrored = lambda: [torch.equal(b.contiguous(), x.flip(2)) for batch in seen for b in batch]
    runs = {flag: str(tmp_path / flag) for flag in ("--flip", "--no-flip")}
    for flag, out in runs.items():
        seen.clear()
        assert ddpm.main(["train", "--data", str(tmp_path / "d"), "--out", out, "--steps", "2", flag, *TINY]) == 0
        assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]["flip"] == (flag == "--flip")
        assert any(mirrored()) == (flag == "--flip")
    seen.clear()
    assert ddpm.main(["train", "--resume", "--out", runs["--no-flip"], "--steps", "4"]) == 0 and not any(mirrored())
    code, err = run_main(["train", "--resume", "--out", runs["--no-flip"], "--steps", "6", "--flip"], capsys)
    assert code == 2 and "--flip True: the run" in err
    ckpt = torch.load(os.path.join(runs["--flip"], "ckpt.pt"), weights_only=True)
    del ckpt["config"]["flip"]                                     # a run from before the setting: flipped (not MNIST)
    torch.save(ckpt, os.path.join(runs["--flip"], "ckpt.pt"))
    seen.clear()
    assert ddpm.main(["train", "--resume", "--out", runs["--flip"], "--steps", "4"]) == 0 and any(mirrored())
    capsys.readouterr()


def test_mnist_defaults_to_its_own_28_px_and_no_flips_where_the_unet_allows(tmp_path, capsys):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in [("train", 8), ("t10k", 2)]:
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">4i", 2051, n, 28, 28) + bytes(n * 784))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">2i", 2049, n) + bytes(range(n)))
    common = ["--data", "mnist", "--data-root", str(tmp_path), "--steps", "1", "--batch-size", "2",
              "--sample-every", "0"]
    for preset, size in [("small", 28), ("paper", 32)]:   # 3 levels halve 28 twice; the paper's 4 would need 8 | size
        out = tmp_path / preset
        assert ddpm.main(["train", *common, "--preset", preset, "--ch", "8", "--out", str(out)]) == 0
        cfg = torch.load(out / "ckpt.pt", weights_only=True)["config"]
        assert cfg["image_size"] == size and cfg["flip"] is False
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------- FID


def test_fid_of_a_checkpoint_equals_fid_of_its_samples_written_as_pngs(ckpts, folder, tmp_path, capsys, fake_inception,
                                                                        monkeypatch):
    args = ["--ref", folder, "--data-root", str(tmp_path / "root"), "--json"]
    drawn = ["--n", "56", "--steps", "3", "--batch-size", "8"]  # Inception's batches of 50 are not the sampler's
    assert ddpm.main(["sample", "--ckpt", ckpts["cond"], *drawn, "--out", str(tmp_path / "s") + "/"]) == 0
    capsys.readouterr()
    real_round = builtins.round
    monkeypatch.setattr(builtins, "round", lambda x, *digits: x if digits else real_round(x))  # all the JSON's digits
    assert ddpm.main(["fid", "--ckpt", ckpts["cond"], *drawn, *args]) == 0
    sampled = json.loads(capsys.readouterr().out)
    assert ddpm.main(["fid", "--samples", str(tmp_path / "s"), *args]) == 0
    written = json.loads(capsys.readouterr().out)
    assert sampled["fid"] == written["fid"] > 0 and sampled["n"] == written["n"] == 56 and sampled["ref_n"] == 6
    assert sampled["sampler"] == "DDIM 3 steps, eta 0.0" and sampled["guidance"] == 2.0 and sampled["seed"] == 0
    assert ddpm.main(["fid", "--samples", folder, *args]) == 0                   # a set against itself
    assert abs(json.loads(capsys.readouterr().out)["fid"]) < 1e-6


def test_reference_statistics_of_a_folder_are_cached_by_what_made_them(folder, tmp_path, monkeypatch):
    shutil.copytree(folder, tmp_path / "d")
    computed, real = [], fid.inception_stats
    monkeypatch.setattr(fid, "inception_stats", lambda *a: computed.append(1) or real(*a))
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "root"))
    net, root = FakeInception(), str(tmp_path / "downloads")
    stats = lambda size=16, network=net, **k: ddpm.fid_reference(fid, network, str(tmp_path / "d"), root, size, **k)
    first, again = stats(), stats()
    assert len(computed) == 1 and all(torch.equal(x, y) for x, y in zip(first[:2], again[:2])) and first[2] == 6
    with pytest.raises(fid.FIDError, match="R = G = B"):                       # RGB images for grey samples
        stats(channels=1)
    Image.new("RGB", (16, 16), "red").save(tmp_path / "d" / "cat" / "1.png")     # the folder changed: computed anew
    changed = stats()
    assert len(computed) == 2 and not torch.equal(changed[0], first[0])
    stats(8)                                                                     # another size, another network
    stats(network=FakeInception(seed=1))
    assert len(computed) == 4 and len(os.listdir(tmp_path / "root" / "fid")) == 4 and not os.path.exists(root)
    for path in glob.glob(str(tmp_path / "root" / "fid" / "*.npz")):  # a file whose key is not ours: never used
        with np.load(path) as f:
            np.savez(path, **{**f, "key": "someone else's"})
    stats()
    assert len(computed) == 5
    for path in glob.glob(str(tmp_path / "root" / "fid" / "*.npz")):           # a truncated file: computed anew
        with open(path, "r+b") as f:
            f.truncate(100)
    again = stats()
    assert len(computed) == 6 and torch.equal(again[0], changed[0])


def test_missing_inception_weights_name_the_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("DDPM_INCEPTION", raising=False)
    import fid
    with pytest.raises(fid.FIDError, match=r"no such file; offline, pass --inception PATH .*DDPM_INCEPTION"):
        ddpm.inception(str(tmp_path / "none.pth"), torch.device("cpu"))


def test_fid_bad_inputs_are_one_line(ckpts, folder, tmp_path, capsys, monkeypatch, fake_inception):
    os.makedirs(tmp_path / "empty" / "c")
    os.makedirs(tmp_path / "one" / "c")
    Image.new("RGB", (16, 16)).save(tmp_path / "one" / "c" / "0.png")
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(3))
    np.savez(tmp_path / "d64.npz", mu=np.zeros(64), sigma=np.eye(64))
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    grey_run(tmp_path)
    capsys.readouterr()
    cases = {
        "no --ref for a folder": (["fid", "--samples", folder], "--ref: which images to compare with?", 2),
        "no images": (["fid", "--samples", str(tmp_path / "empty"), "--ref", folder], "--samples", 2),
        "empty ref": (["fid", "--samples", folder, "--ref", str(tmp_path / "empty")], "--ref", 2),
        "npz without mu": (["fid", "--samples", folder, "--ref", str(tmp_path / "nomu.npz")], "mu and sigma", 2),
        "not an npz": (["fid", "--samples", folder, "--ref", str(tmp_path / "junk.npz")], "mu and sigma", 2),
        "grey against RGB": (["fid", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--ref", folder], "R = G = B", 2),
        "n = 1": (["fid", "--samples", folder, "--ref", folder, "--n", "1"], "--n", 2),
        "n over the folder": (["fid", "--samples", folder, "--ref", folder, "--n", "7"],
                              "--n 7: the data has only 6 images", 2),
        "ref-n over the folder": (["fid", "--samples", folder, "--ref", folder, "--ref-n", "7"],
                                  "--ref-n 7: the data has only 6 images", 2),
        "one image": (["fid", "--samples", str(tmp_path / "one"), "--ref", folder], "at least 2 images", 2),
        "pytorch-fid --dims 64": (["fid", "--samples", folder, "--ref", str(tmp_path / "d64.npz")],
                                  "holds statistics of 64-dimensional features", 2),
    }
    for name, (argv, needle, want) in cases.items():
        code, err = run_main([*argv, "--data-root", str(tmp_path / "root")], capsys)
        assert code == want and needle in err and err.count("\n") == 1 and "Traceback" not in err, (name, err)


# torch.save's zip writer on a full disk (seen on a 3 MB tmpfs): a RuntimeError after part of the file, no OSError
ZIP_WRITER_FULL = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2167104 vs 2166992")


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), ZIP_WRITER_FULL])
def test_a_full_disk_while_training_is_one_line_naming_the_checkpoint_that_is_whole(folder, tmp_path, monkeypatch,
                                                                                   capsys, error):
    out, real, calls = tmp_path / "run", torch.save, []

    def full_at_second(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"part of a checkpoint")
            monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 4096))
            raise error
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_at_second)
    code, err = run_main(["train", "--data", folder, "--out", str(out), "--steps", "5", "--save-every", "1", *TINY],
                         capsys)
    assert code == 1 and err.count("\n") == 2 and "Traceback" not in err, err      # the start line, then the error
    assert "No space left on device" in err and f"{out}/ckpt.pt of step 1 is whole" in err
    assert f"ddpm.py train --resume --out {out}" in err and sorted(os.listdir(out)) == [".lock", "ckpt.pt", "log.txt"]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 1


def test_a_write_that_fails_otherwise_is_one_line_too(tmp_path):
    def broken(f):
        f.write(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4 vs 0\n")
    with pytest.raises(OSError) as e:
        ddpm.save_atomic(str(tmp_path / "x.pt"), broken)  # a disk with room: not called full
    assert e.value.errno == errno.EIO and os.listdir(tmp_path) == []
    assert e.value.strerror == "the write failed (RuntimeError: [enforce fail at inline_container.cc:672] . " \
                               "unexpected pos 4 vs 0)"
    with pytest.raises(TypeError):  # a bug is not a write error: it keeps its traceback
        ddpm.save_atomic(str(tmp_path / "x.pt"), lambda f: f.write("text"))


def test_a_run_folder_that_vanishes_and_a_full_disk_while_sampling_are_one_line(ckpts, folder, tmp_path, monkeypatch,
                                                                               capsys):
    out, real = tmp_path / "run", ddpm.save_atomic

    def vanish(path, *a, **k):
        shutil.rmtree(out, ignore_errors=True)
        return real(path, *a, **k)
    monkeypatch.setattr(ddpm, "save_atomic", vanish)
    code, err = run_main(["train", "--data", folder, "--out", str(out), "--steps", "3", *TINY], capsys)
    assert code == 1 and "No such file or directory" in err and "no checkpoint is left" in err
    assert "Traceback" not in err
    monkeypatch.setattr(ddpm, "save_atomic", real)

    saves, real_save = [], Image.Image.save

    def full_after_two(self, f, *a, **k):  # the disk fills up at the third picture, halfway into it
        saves.append(1)
        if len(saves) <= 2:
            return real_save(self, f, *a, **k)
        f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Image.Image, "save", full_after_two)
    code, err = run_main(["sample", "--ckpt", ckpts["cond"], "--n", "5", "--steps", "1", "--batch-size", "8", "--out",
                          str(tmp_path / "each") + "/"], capsys)
    assert code == 1 and err.count("\n") == 1 and "No space left on device" in err
    written = sorted(os.listdir(tmp_path / "each"))  # two whole pictures, nothing half-written, no temporary file
    assert len(written) == 2 and all(f.endswith(".png") and ".tmp" not in f for f in written)
    assert all(Image.open(tmp_path / "each" / f).size == (16, 16) for f in written)


def test_a_decode_cache_that_cannot_be_written_never_stops_a_run(folder, tmp_path, monkeypatch, capsys):
    def full(f, array, *a, **k):  # what numpy raises when the disk fills: an OSError without errno, after part of it
        f.write(b"\x93NUMPY part")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 ** 9, 10 ** 9, 0))
        raise OSError("12288 requested and 3968 written")
    monkeypatch.setattr(np, "save", full)
    root, out = tmp_path / "root", tmp_path / "run"
    monkeypatch.setenv("DDPM_CACHE", str(root))
    code, err = run_main(["train", "--data", folder, "--out", str(out), "--steps", "2", *TINY], capsys)
    assert code == 0 and err.count("note: the decoded images are not cached in") == 1, err
    assert "(No space left on device); they are decoded again next time" in err and os.listdir(root / "images") == []
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def _tracker(name):
    """The tracker's module, or a skip where it is not installed; never a skip in CI (.ci/run sets DDPM_CI)."""
    return importlib.import_module(name) if os.environ.get("DDPM_CI") else pytest.importorskip(name)


def _wandb_history(path):
    """The history rows of a W&B .wandb file: a 7-byte header, then LevelDB-style records (crc32, length, type: 1 whole,
    2 first, 3 middle, 4 last part) in 32 KiB blocks, each record a protobuf wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2
    data, pos, pending, rows = open(path, "rb").read(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # no room for a record header: the block's tail is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_fid_and_trackers_leave_the_training_bitwise_as_it_was_and_a_resume_continues_them(folder, tmp_path,
                                                                                         monkeypatch, capsys,
                                                                                         fake_inception):
    _tracker("tensorboard"), _tracker("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network needed, none used
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, plain = tmp_path / "run", tmp_path / "plain"
    args = ["train", "--data", folder, "--steps", "4", "--dropout", "0.3", "--log-every", "1", "--data-root",
            str(tmp_path / "root"), *TINY, "--timesteps", "5"]
    assert ddpm.main([*args, "--out", str(plain)]) == 0
    assert ddpm.main([*args, "--out", str(out), "--fid-every", "2", "--fid-n", "5", "--keep-every", "2",
                      "--sample-every", "4", "--report-to", "tensorboard,wandb"]) == 0
    shutil.copy(out / "ckpt.pt", tmp_path / "first.pt")
    shutil.copy(out / "ckpt_00000002.pt", out / "ckpt.pt")  # as if it had died at step 4, its last checkpoint step 2
    assert ddpm.main(["train", "--resume", "--out", str(out)]) == 0
    paths = (plain / "ckpt.pt", tmp_path / "first.pt", out / "ckpt.pt")
    ckpts = [torch.load(path, weights_only=True) for path in paths]
    for other in ckpts[1:]:  # FID, previews and trackers draw nothing from training's random streams
        for part in ("model", "optimizer", "ema"):
            flat_a, flat_b = (torch.utils._pytree.tree_flatten(c[part])[0] for c in (ckpts[0], other))
            assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(flat_a, flat_b)), part
    cfg, log = ckpts[2]["config"], (out / "log.txt").read_text()
    assert cfg["report_to"] == ("tensorboard", "wandb") and len(cfg["wandb_id"]) == 8
    fids = re.findall(r"^step (\d+) fid (\S+) n 5 DDIM 5 steps, eta 0.0, guidance 2.0$", log, re.M)
    assert [s for s, _ in fids] == ["2", "4", "4"] and fids[1] == fids[2] and all(float(v) > 0 for _, v in fids)
    lines = re.findall(r"^step (\d+) loss (\S+) lr (\S+) grad_norm (\S+) img/s (\S+)$", log, re.M)
    assert [int(s) for s, *_ in lines] == [1, 2, 3, 4, 3, 4]  # the resumed run logs steps 3 and 4 again
    picture = Image.open(out / "progress.png").convert("RGB")
    colours = {colour for _, colour in picture.getcolors(1 << 20)}
    assert picture.size == (640, 320) and (255, 165, 0) in colours and (0, 0, 0) in colours   # FID, smoothed loss

    def same(row, line):  # equal to log.txt's figures, to the digits it prints
        return int(line[0]) == row["step"] and all(abs(row[k] - float(v)) <= 0.51 * float(f"1e{e}")
                                                    for k, v, e in zip(("loss", "lr", "grad_norm", "img_s"), line[1:],
                                                                       (-5, int(line[2][-3:]) - 3, -3, -1)))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()  # tensorboard's own reader: one folder, the steps after the checkpoint purged and written anew
    assert len(os.listdir(out / "tensorboard")) == 2 and sorted(events.Tags()["scalars"]) == ["fid", "grad_norm",
                                                                                             "img_s", "loss", "lr"]
    rows = [dict(step=e.step, **{k: events.Scalars(k)[i].value for k in ("loss", "lr", "grad_norm", "img_s")})
            for i, e in enumerate(events.Scalars("loss"))]
    assert len(rows) == 4 and all(same(row, line) for row, line in zip(rows, lines[:2] + lines[4:])), (rows, lines)
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("fid")] == [(int(s), float(v)) for s, v in fids[::2]]
    assert [(e.step, e.width, e.height) for e in events.Images("samples")] == [(4, 545, 35)]  # the resumed run's
    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))  # W&B: one run, continued by the resume
    assert len(runs) == 2 and all(r.endswith("-" + cfg["wandb_id"]) for r in runs)
    for run, expected, fid_steps in zip(runs, (lines[:4], lines[4:]), ([2, 4], [4])):
        history = _wandb_history(glob.glob(os.path.join(run, "run-*.wandb"))[0])
        scalars = [row for row in history if "loss" in row]
        assert len(scalars) == len(expected) and all(same(row, line) for row, line in zip(scalars, expected)), scalars
        assert [(row["step"], round(row["fid"], 4)) for row in history if "fid" in row] == \
            [(int(s), float(v)) for s, v in fids if int(s) in fid_steps][:len(fid_steps)]
        assert [row["step"] for row in history if "samples/_type" in row] == [4]
    capsys.readouterr()


def test_a_tracker_that_is_not_installed_is_one_line_before_any_data_is_read(tmp_path, monkeypatch, capsys):
    for module, name in [("torch.utils.tensorboard", "tensorboard"), ("wandb", "wandb")]:
        monkeypatch.setitem(sys.modules, module, None)
        code, err = run_main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"),
                              "--report-to", f"{name},{name}"], capsys)
        assert code == 2 and err.count("\n") == 1 and f"--report-to {name} needs the {name} package: pip install " \
            f"{name}" in err, err
    assert not os.path.exists(tmp_path / "r")


def test_a_resumed_run_whose_data_went_away_says_how_to_go_on(folder, tmp_path, capsys):
    shutil.copytree(folder, tmp_path / "d")
    out = str(tmp_path / "run")
    assert ddpm.main(["train", "--data", str(tmp_path / "d"), "--out", out, "--steps", "1", *TINY]) == 0
    shutil.rmtree(tmp_path / "d")
    capsys.readouterr()
    code, err = run_main(["train", "--resume", "--out", out, "--steps", "2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no such folder" in err
    assert f"{out}/ckpt.pt of step 1 is whole: pass --data with --resume" in err


def test_ddpm_alone_trains_and_samples_and_names_the_file_each_other_command_needs(folder, ckpts, tmp_path,
                                                                                  monkeypatch, capsys):
    import ast
    tree = ast.parse(open(ddpm.__file__).read())  # fid and pictures are imported inside the commands only
    top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert not top & {"fid", "pictures", "nll", "convert", "trackers"} and "importlib" in top
    for name in ("fid", "pictures", "nll", "trackers"):
        monkeypatch.setitem(sys.modules, name, None)  # as if ddpm.py had been copied alone: importing them fails
    run = tmp_path / "run"
    code, err = run_main(["train", "--data", folder, "--out", str(run), "--steps", "2", "--log-every", "1", *TINY],
                         capsys)
    assert code == 0 and err.count("progress.png needs pictures.py, which comes with ddpm.py") == 1
    assert sorted(os.listdir(run)) == [".lock", "ckpt.pt", "log.txt"]
    code, err = run_main(["sample", "--ckpt", str(run / "ckpt.pt"), "--n", "2", "--steps", "2", "--out",
                          str(tmp_path / "s.png")], capsys)
    assert code == 0 and Image.open(tmp_path / "s.png").size == (18, 35)  # a row per class, one sample each
    for argv, needs in [(["fid", "--ckpt", ckpts["cond"], "--ref", folder], "fid needs fid.py"),
                        (["forward", "--data", folder], "forward needs pictures.py"),
                        (["sample", "--ckpt", ckpts["cond"], "--process"], "sample needs pictures.py"),
                        (["inpaint", folder, "--ckpt", ckpts["cond"]], "inpaint needs pictures.py"),
                        (["interpolate", "--ckpt", ckpts["cond"]], "interpolate needs pictures.py"),
                        (["img2img", folder, "--ckpt", ckpts["cond"]], "img2img needs pictures.py"),
                        (["nll", "--ckpt", ckpts["cond"], "--data", folder], "nll needs nll.py"),
                        (["train", "--data", folder, "--out", str(tmp_path / "t"), "--report-to", "tensorboard", *TINY],
                         "train needs trackers.py"),
                        (["train", "--data", folder, "--out", str(tmp_path / "f"), "--fid-every", "1", *TINY],
                         "train needs fid.py")]:
        code, err = run_main([*argv, "--data-root", str(tmp_path)] if argv[0] == "fid" else argv, capsys)
        assert code == 2 and err.count("\n") == 1 and needs in err and "put it beside ddpm.py" in err, (argv, err)
    assert not os.path.exists(tmp_path / "f")


# ------------------------------------------------------------------------------------------ the method half, copied alone
def method_half(tmp_path):
    """The lines of ddpm.py above the divider, alone in a module of their own (nothing else from ddpm.py)."""
    lines = open(os.path.join(HERE, "ddpm.py"), encoding="utf-8").read().split("\n")
    cut = next(i for i, line in enumerate(lines) if line.startswith("# ===") and "tool" in line.lower())
    path = tmp_path / "method_only.py"
    path.write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
    spec = importlib.util.spec_from_file_location("method_only", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, cut


def test_method_half_alone_trains_with_its_step_and_samples_with_each_sampler(tmp_path):
    m, cut = method_half(tmp_path)
    assert not hasattr(m, "Trainer") and not hasattr(m, "os") and not hasattr(m, "argparse")  # the method alone
    torch.manual_seed(0)
    model = m.UNet(3, 16, (1, 2), 1, (8,), 0.0, 16, num_classes=2)
    ema = m.EMA(model, 0.9)
    opt = torch.optim.Adam(model.parameters())
    diffusion = m.Diffusion(20)
    hp = dict(lr=1e-3, warmup=2, grad_clip=1.0, p_uncond=0.2, micro_batch=2, loss="l2")
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    y = torch.tensor([0, 1, 0, 1])
    g = torch.Generator().manual_seed(1)
    before = [p.detach().clone() for p in model.parameters()]
    lrs = []
    for step in range(3):
        lr, loss, grad_norm = m.train_step(model, ema, opt, diffusion, x0, y, step, hp, g)
        assert math.isfinite(loss.item()) and math.isfinite(grad_norm.item())
        lrs.append(lr)
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])  # the warm-up: lr · min(1, (step + 1) / warmup)
    assert ema.num_updates == 3 and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # The same module, run by ddpm.py's own classes, gives the same samples bit for bit with each sampler.
    reference = ddpm.Diffusion(20)
    for options in [dict(), dict(steps=5), dict(steps=5, eta=1.0), dict(steps=5, sampler="dpm++")]:
        x = diffusion.sample(ema.model, 4, y, 2.0, generator=torch.Generator().manual_seed(2), **options)
        assert x.shape == (4, 3, 16, 16) and x.abs().max() <= 1
        same = reference.sample(ema.model, 4, y, 2.0, generator=torch.Generator().manual_seed(2), **options)
        assert torch.equal(x, same), options


def test_method_half_reads_no_module_globals_but_imports_functions_and_classes(tmp_path):
    """Every group of functions copies out alone: inside a function, the only globals are modules, functions and
    classes (of the method itself or of torch), never a table or setting defined at module level."""
    m, _ = method_half(tmp_path)
    import inspect, types
    for name, obj in vars(m).items():
        functions = []
        if inspect.isfunction(obj) and obj.__module__ == "method_only":
            functions = [obj]
        if inspect.isclass(obj) and obj.__module__ == "method_only":
            functions = [f for f in vars(obj).values() if inspect.isfunction(getattr(f, "__wrapped__", f))]
            functions = [getattr(f, "__wrapped__", f) for f in functions]
        for f in functions:
            for used in f.__code__.co_names:
                value = vars(m).get(used)
                if value is None:
                    continue
                callables = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)
                assert isinstance(value, callables), (name, f.__name__, used)


def test_samples_that_are_not_finite_are_written_black_and_said(ckpts, tmp_path, capsys):
    """A model whose weights hold a NaN samples NaN, which a PNG stores as 0: a note says why the images are black."""
    ckpt = torch.load(ckpts["cond"], weights_only=True)
    ckpt["ema"]["model"]["conv_in.weight"][0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    out = tmp_path / "black.png"
    code, err = run_main(["sample", "--ckpt", str(tmp_path / "nan.pt"), "--n", "2", "--steps", "3", "--out", str(out)],
                         capsys)
    assert code == 0 and "note: 2 of 2 samples hold NaN or inf" in err
    assert np.asarray(Image.open(out)).max() == 0  # the samples and make_grid's padding: all black
