"""Tests for the variational bound in bits/dim (Ho et al.'s Eq. 5 and Table 2): its two functions against
torch.distributions and the normal CDF written out, its terms against closed forms for an ε-oracle, the unbiased
--t-samples estimate, and `ddpm.py nll` with its one-line refusals. CPU only."""
import json, math

import pytest
import torch

import ddpm
import nll
from conftest import Oracle, grey_run, run_main

LN2 = math.log(2)


def phi(z):  # the standard normal CDF, from math.erf (independent of torch.special)
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_normal_kl_equals_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    p = torch.distributions.Normal(m1, (0.5 * lv1).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    assert torch.allclose(ddpm.normal_kl(m1, lv1, m2, lv2), torch.distributions.kl_divergence(p, q), atol=1e-12)


@pytest.mark.parametrize("mean,log_scale", [(0.0, math.log(0.01)), (0.3, math.log(0.2)), (-0.97, math.log(0.004)),
                                            (0.999, math.log(0.05)), (5.0, math.log(0.3))])
def test_discretized_likelihood_sums_to_one_over_256_values_and_equals_cdf_differences(mean, log_scale):
    x = torch.arange(256, dtype=torch.float32) * 2 / 255 - 1                    # the 256 pixel values
    log_p = ddpm.discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert log_p.exp().double().sum().item() == pytest.approx(1.0, abs=2e-5)
    s = math.exp(log_scale)
    for k in range(256):
        v = 2 * k / 255 - 1
        upper = 1.0 if k == 255 else phi((v + 1 / 255 - mean) / s)                # open ends at ±1
        lower = 0.0 if k == 0 else phi((v - 1 / 255 - mean) / s)
        if upper - lower > 1e-9:
            expected = math.log(upper - lower)
            assert log_p[k].item() == pytest.approx(expected, abs=1e-4 + 1e-4 * abs(expected)), k
        else:  # far in a tail: clipped at 1e-12 (as Ho et al.'s), or the exact log Φ at an open end
            assert log_p[k].item() < math.log(1e-9) + 1e-3, k


def test_prior_term_matches_closed_form():
    d = ddpm.Diffusion(1000)
    x0 = torch.tensor([-1.0, 0.0, 0.5, 1.0]).view(1, 1, 2, 2)
    a = d.alphas_cumprod[-1].double().item()
    kl = [0.5 * (-1 - math.log(1 - a) + (1 - a) + a * v * v) for v in (-1.0, 0.0, 0.5, 1.0)]   # KL(N(√ᾱx, 1−ᾱ)‖N(0,1))
    assert d.prior_bpd(x0).item() == pytest.approx(sum(kl) / 4 / LN2, rel=1e-4)
    assert d.prior_bpd(x0).item() < 1e-4  # ᾱ_{T−1} ≈ 4e-5: the prior costs next to nothing


def oracle_terms(variance, T=30):
    """Every term of the bound for an ε-oracle of single-point data x*, whose pixels are on the 256-value grid."""
    d = ddpm.Diffusion(T, variance=variance)
    g = torch.Generator().manual_seed(0)
    x_star = (torch.randint(0, 256, (1, 3, 4, 4), generator=g).float() * 2 / 255 - 1)
    x_star[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])                              # both open ends too
    model = Oracle(d, x_star)
    x0 = x_star.expand(T, -1, -1, -1)
    t = torch.arange(T)
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    return d, x_star, d.vb_terms_bpd(model, x0, x_t, t)


def decoder_closed_form(x_star, variance_t0):
    """−log p(x* | x_1) when the model's mean is x* exactly: each pixel's bin ±1/255 around its mean."""
    s = math.sqrt(variance_t0)
    inner = -math.log(2 * phi(1 / 255 / s) - 1)
    edge = -math.log(phi(1 / 255 / s))
    nats = [edge if abs(v) > 0.999 else inner for v in x_star.flatten().tolist()]
    return sum(nats) / len(nats) / LN2


def test_oracle_bound_fixedsmall_has_zero_kl_terms_and_closed_form_decoder():
    d, x_star, terms = oracle_terms("fixedsmall")
    assert terms[1:].abs().max().item() < 1e-5                                  # q and p_θ agree for every t ≥ 1
    beta_tilde_1 = d.posterior_variance[1].double().item()                      # log σ² clipped at t = 0
    assert terms[0].item() == pytest.approx(decoder_closed_form(x_star, beta_tilde_1), rel=1e-4)


def test_oracle_bound_fixedlarge_kl_terms_match_closed_form():
    d, x_star, terms = oracle_terms("fixedlarge")
    for t in range(1, d.num_timesteps):  # equal means: KL = ½ (−1 + log β_t − log β̃_t + β̃_t / β_t) per dimension
        b, bt = d.betas[t].double().item(), d.posterior_variance[t].double().item()
        assert terms[t].item() == pytest.approx(0.5 * (-1 + math.log(b / bt) + bt / b) / LN2, rel=1e-3, abs=1e-6)
    assert terms[0].item() == pytest.approx(decoder_closed_form(x_star, d.posterior_variance[1].item()), rel=1e-4)


def test_t_samples_estimate_is_unbiased():
    """The mean of many --t-samples estimates comes within 3 standard errors of the exact sum of the KL terms."""
    T = 40
    d = ddpm.Diffusion(T, variance="fixedlarge")
    model = ddpm.UNet(1, 8, (1, 2), 1, (), 0.0, 8).eval()
    from conftest import randomize
    randomize(model, seed=3)
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    prior, decoder, kl = nll.bits_per_dim(model, d, images, batch_size=256, progress=False)
    estimates = []
    for seed in range(60):
        p, dec, k = nll.bits_per_dim(model, d, images, batch_size=256, t_samples=3, seed=seed, progress=False)
        assert torch.equal(p, prior)
        estimates.append(k)
    estimates = torch.stack(estimates)                                           # (draws, images)
    mean, se = estimates.mean(0), estimates.std(0) / len(estimates) ** 0.5
    assert ((mean - kl).abs() <= 3 * se).all(), (mean, kl, se)
    assert (se > 0).all() and (estimates.std(0) > 0.01 * kl).all()               # the draws really differ


def test_nll_command_reports_the_bound_and_its_terms(ckpts, folder, capsys):
    """The tiny checkpoint (T = 50) on its own 6 images: the JSON's terms are bits_per_dim's, and they add up."""
    code = ddpm.main(["nll", "--ckpt", ckpts["cond"], "--data", folder, "--json", "--t-samples", "49"])
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert code == 0 and result["n"] == 6 and result["exact"] and result["terms"] == "all terms"
    assert result["bpd"] == pytest.approx(result["prior"] + result["decoder"] + result["kl"], abs=2e-4)
    model, _, _, cfg = ddpm.load_sampler(ckpts["cond"], torch.device("cpu"))
    d = ddpm.Diffusion(cfg["timesteps"], cfg["schedule"], "fixedlarge")
    images = ddpm.load_images(folder, image_size=None, pick=None)[0]
    prior, decoder, kl = nll.bits_per_dim(model, d, images, progress=False)
    assert result["bpd"] == pytest.approx((prior + decoder + kl).mean().item(), abs=1e-4)
    assert result["se"] == pytest.approx((prior + decoder + kl).std().item() / 6 ** 0.5, abs=1e-4)
    code = ddpm.main(["nll", "--ckpt", ckpts["cond"], "--data", folder, "--n", "3", "--t-samples", "5"])
    line = capsys.readouterr().out
    assert code == 0 and line.startswith("NLL ≤ ") and "of 3 images" in line and "5 of the 49 KL terms an image, estimated" in line


def test_nll_refusals_are_one_line(ckpts, folder, tmp_path, capsys):
    grey = grey_run(tmp_path)
    capsys.readouterr()
    cases = [
        (["--data", folder, "--split", "valid"], "invalid choice"),                       # an unknown split
        (["--data", folder, "--split", "test"], "is a folder, scored whole"),
        (["--data", folder, "--n", "7"], "--n 7: the data has only 6 images"),
        (["--data", folder, "--t-samples", "0"], "outside [1, 100000]"),
        (["--data", folder, "--t-samples", "50"], "T − 1 = 49 terms"),
        (["--data", str(tmp_path / "grey")], "its images are 1×16×16 (channels × pixels), the model's are 3×16×16"),
        (["--data", folder, "--ckpt", grey], "its images are 3×16×16 (channels × pixels), the model's are 1×16×16"),
    ]
    for extra, message in cases:
        argv = ["nll", "--ckpt", ckpts["cond"], *extra]
        code, err = run_main(argv, capsys)
        assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, (extra, err)
