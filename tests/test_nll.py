"""Tests for the variational bound in bits/dim (Ho et al.'s Eq. 5 and Table 2): its two functions against
torch.distributions and the normal CDF written out, its terms against closed forms for an ε-oracle, the unbiased
--t-samples estimate, and `ddpm.py nll` with its one-line refusals. CPU only."""
import json

import pytest
import torch

import ddpm
from ddpm_tool import cli, data, nll, sampling
from conftest import grey_run, run_main


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
    code = cli.main(["nll", "--ckpt", ckpts["cond"], "--data", folder, "--json", "--t-samples", "49"])
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert code == 0 and result["n"] == 6 and result["exact"] and result["terms"] == "all terms"
    assert result["bpd"] == pytest.approx(result["prior"] + result["decoder"] + result["kl"], abs=2e-4)
    run = sampling.load_run(ckpts["cond"], "cpu")
    d = ddpm.Diffusion(run.cfg["timesteps"], run.cfg["schedule"], "fixedlarge")
    images = data.load_images(folder, image_size=None, pick=None)[0]
    prior, decoder, kl = nll.bits_per_dim(run.model, d, images, progress=False)
    assert result["bpd"] == pytest.approx((prior + decoder + kl).mean().item(), abs=1e-4)
    assert result["se"] == pytest.approx((prior + decoder + kl).std().item() / 6 ** 0.5, abs=1e-4)
    code = cli.main(["nll", "--ckpt", ckpts["cond"], "--data", folder, "--n", "3", "--t-samples", "5"])
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
