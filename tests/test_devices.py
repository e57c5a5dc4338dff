"""Tests for ddpm_tool/devices.py: the precision `auto` picks, and bf16 sampling against fp32."""
import pytest
import torch

import ddpm
from ddpm_tool import devices
from conftest import randomize, run_main


@pytest.mark.parametrize("capability,flags,sample", [
    ("AVX512", {"amx_bf16": True, "avx512_bf16": True}, "bf16"),    # Intel since Sapphire Rapids (AMX)
    ("AVX512", {"amx_bf16": False, "avx512_bf16": True}, "bf16"),   # AMD since Zen 4
    ("AVX512", {"amx_bf16": False, "avx512_bf16": False}, "fp32"),  # AVX-512 without bf16 (Skylake-X, Ice Lake)
    ("AVX2", {"amx_bf16": False, "avx512_bf16": False}, "fp32"),    # bf16 emulated: 7× slower
    ("AVX2", {"amx_bf16": True, "avx512_bf16": True}, "fp32"),      # ATen held to AVX2 (ATEN_CPU_CAPABILITY=avx2)
    ("DEFAULT", {}, "fp32")])
def test_precision_auto_is_bf16_for_cpu_sampling_only_where_the_cpu_computes_bf16(capability, flags, sample):
    cpu = torch.device("cpu")
    assert devices.resolve_precision("auto", cpu, "sample", (capability, flags)) == sample
    assert devices.resolve_precision("auto", cpu, "train", (capability, flags)) == "fp32"  # 1.1× is not worth it
    for forced in ("fp32", "bf16"):
        assert devices.resolve_precision(forced, cpu, "sample", (capability, flags)) == forced
    assert devices.resolve_precision("auto", torch.device("cuda"), "train") == "bf16"
    assert devices.resolve_precision("auto", torch.device("mps"), "sample") == "fp32"


def test_a_bf16_sample_equals_the_fp32_one_to_rounding_and_steps_in_fp32():
    d, cpu = ddpm.Diffusion(50), torch.device("cpu")
    # the network of earlier releases, on which the margin was measured (a random network's rounding is chaotic)
    model = randomize(ddpm.UNet(3, 16, (1, 2), 1, (4,), 0.0, 8, num_classes=3, same_padding=False, norm_eps=1e-5))
    noise, y = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])
    dtypes = []
    run = lambda: d.sample(model, 4, y, 2.0, 10, noise=noise, sampler="dpm++", spacing="quadratic",
                           callback=lambda t, x_t, x0: dtypes.append((x_t.dtype, x0.dtype)))
    fp32 = run()
    with devices.autocast(cpu, "bf16"):
        bf16 = run()
    assert bf16.dtype == torch.float32 and set(dtypes) == {(torch.float32, torch.float32)}  # x_t, x̂_0, the clip
    rmse = (bf16 - fp32).pow(2).mean().sqrt().item()
    assert 0 < rmse < 0.02, rmse  # measured 0.0075 (bf16 keeps 8 bits: 0.4 % a product); 0: autocast did nothing


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
