"""Tests for Ho et al.'s exact network and the way to and from diffusers (ddpm_tool/convert.py, `--ckpt FOLDER`, `export
--format diffusers`): the downsampling padding against TensorFlow's "SAME" rule written out by hand, ε̂ against
diffusers' UNet2DModel in both directions, the ancestral sampler against DDPMPipeline, and each refusal in one line.
CPU only; nothing is downloaded (HF_HUB_OFFLINE)."""
import json, os, shutil

import numpy as np
import pytest
import torch

import ddpm
from ddpm_tool import runs, sampling
from conftest import randomize, run_main


diffusers = pytest.importorskip("diffusers") if not os.environ.get("DDPM_CI") else __import__("diffusers")


GOOGLE_CIFAR10 = dict(  # google/ddpm-cifar10-32's config.json (Ho et al.'s CIFAR-10 network, converted)
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=[128, 256, 256, 256], layers_per_block=2,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], downsample_padding=0,
    norm_num_groups=32, norm_eps=1e-6, attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, act_fn="silu",
    center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional")


SMALL = dict(GOOGLE_CIFAR10, sample_size=8, block_out_channels=[128, 128], layers_per_block=1,
             down_block_types=["AttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "AttnUpBlock2D"])


SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                 variance_type="fixed_large", clip_sample=True)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def random_unet(config, seed=0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**config)
    with torch.no_grad():
        for p in unet.parameters():  # diffusers zero-initialises nothing we rely on; random everywhere
            p.copy_(torch.randn(p.shape) * 0.05)
    return unet.eval()


def save_pipeline(tmp_path, config, scheduler=SCHEDULER, name="pipe", seed=0):
    folder = tmp_path / name
    unet = random_unet(config, seed)
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**scheduler)).save_pretrained(folder)
    return str(folder)


def test_new_networks_are_hos_and_old_checkpoints_load_as_they_were_trained(ckpts):
    net = ddpm.UNet()
    assert all(m.same for m in net.modules() if isinstance(m, ddpm.Downsample))
    assert {m.eps for m in net.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-6}
    bundled = sampling.load_checkpoint(os.path.join(ddpm.__file__.rsplit("/", 1)[0], "samples", "cifar10_small.pt"))
    assert bundled["config"]["same_padding"] is False and bundled["config"]["norm_eps"] == 1e-5
    # and as ε-prediction with Ho et al.'s loss, generating: keys older releases lack take the defaults
    assert {k: bundled["config"][k] for k in ("prediction", "snr_gamma", "task")} == dict(prediction="eps",
                                                                                          snr_gamma=0, task="generate")
    model = runs.unet_from_config(bundled["config"], 10)
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.GroupNorm)} == {1e-5}
    assert sampling.load_checkpoint(ckpts["cond"])["config"]["same_padding"] is True  # trained here, now


def test_google_cifar10_folder_loads_through_ckpt_with_diffusers_eps(tmp_path):
    unet = random_unet(GOOGLE_CIFAR10)
    folder = tmp_path / "google"
    unet.save_pretrained(folder)  # a bare UNet2DModel folder, as google/ddpm-cifar10-32's files are laid out
    diffusers.DDPMScheduler(**SCHEDULER).save_pretrained(folder)
    folder = str(folder)
    run = sampling.load_run(folder, "cpu")
    model = run.model
    assert run.classes == [] and run.cfg["unconditional"] and sum(p.numel() for p in model.parameters()) == 35_746_307
    assert run.cfg["same_padding"] and run.cfg["norm_eps"] == 1e-6 and run.diffusion.num_timesteps == 1000
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([3, 917])
    with torch.no_grad():
        ours, theirs = model(x, t), unet(x, t).sample
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_ancestral_sampler_equals_ddpm_pipeline(tmp_path):
    scheduler = dict(SCHEDULER, num_train_timesteps=20, beta_start=1000 / 20 * 1e-4, beta_end=1000 / 20 * 0.02)
    folder = save_pipeline(tmp_path, SMALL, scheduler)
    pipe = diffusers.DDPMPipeline.from_pretrained(folder, low_cpu_mem_usage=False)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=20,
                  output_type="np").images
    run = sampling.load_run(folder, "cpu")
    ours = run.diffusion.sample(run.model, 2, generator=torch.Generator().manual_seed(3))
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    # the same function in float32, in another order ((x − sqrt(1 − ᾱ) ε) / sqrt(ᾱ) there, sqrt(1/ᾱ) x − … here):
    # rounding, carried through 20 steps of a random network, stays below a tenth of a uint8 level
    difference = abs(ours - theirs)
    assert difference.max() <= 1e-3 and float(np.median(difference)) <= 1e-6


def test_export_loads_in_ddpm_pipeline_with_equal_eps_and_back_bit_for_bit(tmp_path, capsys):
    cfg = dict(runs.DEFAULTS, ch=128, ch_mult=(1, 1), num_res_blocks=1, attn_res=(8,), image_size=8,
               channels=3, unconditional=False, timesteps=50, variance="fixedlarge")
    model = randomize(runs.unet_from_config(cfg, 3))
    ckpt = dict(config=cfg, classes=["a", "b", "c"], step=7, ema=dict(model=model.state_dict()))
    torch.save(ckpt, tmp_path / "ckpt.pt")
    for keep, out in [(False, "folded"), (True, "kept")]:
        flags = ["--keep-classes"] if keep else []
        code, err = run_main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / out),
                              "--format", "diffusers", *flags], capsys)
        assert code == 0, err
        pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / out), low_cpu_mem_usage=False)
        assert pipe.scheduler.config.num_train_timesteps == 50 and pipe.scheduler.config.beta_end == pytest.approx(0.4)
        x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 20, 49])
        with torch.no_grad():
            if keep:  # the U-Net with labels, the last one the null label
                y = torch.tensor([0, 2, 3])
                assert (pipe.unet(x, t, class_labels=y).sample - model(x, t, y)).abs().max() <= 1e-4
            else:  # the unconditional model that guidance uses
                assert (pipe.unet(x, t).sample - model(x, t, None)).abs().max() <= 1e-4
    back = sampling.load_checkpoint(str(tmp_path / "kept"))  # the names ride in unet/config.json's "_ddpm_classes"
    assert back["classes"] == ["a", "b", "c"] and back["config"]["ch_mult"] == (1, 1)
    assert json.load(open(tmp_path / "kept" / "unet" / "config.json"))["_ddpm_classes"] == ["a", "b", "c"]
    code, err = run_main(["sample", "--ckpt", str(tmp_path / "kept"), "--class", "c", "--n", "1", "--steps", "1",
                          "--out", str(tmp_path / "c.png")], capsys)
    assert code == 0 and "Traceback" not in err and os.path.isfile(tmp_path / "c.png")
    ours = model.state_dict()
    assert back["ema"]["model"].keys() == ours.keys()
    assert all(torch.equal(back["ema"]["model"][k], ours[k]) for k in ours)


def test_a_folder_with_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path, capsys):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(SMALL, _class_name="UNet2DModel")))
    flag = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {flag}",))
    torch.save({"w": Evil()}, folder / "diffusion_pytorch_model.bin")  # as a crafted weights file would be
    code, err = run_main(["sample", "--ckpt", str(folder), "--n", "1", "--steps", "1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "refused, it holds a pickled Python object" in err
    assert not flag.exists()


def exported(tmp_path, capsys, **config):
    """A random unconditional model of ch 128, ch-mult 1,1, one block, 3 channels (config: the rest), saved as a
    checkpoint and exported by `export --format diffusers` into tmp_path/d → the model."""
    cfg = dict(runs.DEFAULTS, ch=128, ch_mult=(1, 1), num_res_blocks=1, channels=3, unconditional=True, **config)
    model = randomize(runs.unet_from_config(cfg, 0))
    torch.save(dict(config=cfg, classes=[], step=1, ema=dict(model=model.state_dict())), tmp_path / "ckpt.pt")
    code, err = run_main(["export", "--ckpt", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "d"), "--format",
                          "diffusers"], capsys)
    assert code == 0, err
    return model


@pytest.mark.parametrize("prediction, name", [("v", "v_prediction"), ("x0", "sample")])
def test_a_v_or_x0_model_exports_with_its_prediction_type_and_samples_in_ddpm_pipeline_as_here(tmp_path, capsys,
                                                                                                prediction, name):
    exported(tmp_path, capsys, attn_res=(8,), image_size=8, timesteps=20, variance="fixedlarge", prediction=prediction)
    pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "d"), low_cpu_mem_usage=False)
    assert pipe.scheduler.config.prediction_type == name
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=20,
                  output_type="np").images
    run = sampling.load_run(str(tmp_path / "d"), "cpu")
    assert run.cfg["prediction"] == prediction and run.diffusion.prediction == prediction
    ours = run.diffusion.sample(run.model, 2, generator=torch.Generator().manual_seed(3))
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    difference = abs(ours - theirs)  # as for ε: float32 rounding in another order, through 20 steps
    assert difference.max() <= 1e-3 and float(np.median(difference)) <= 1e-6


def test_refusals_are_one_line(tmp_path, capsys):
    cases = [
        (dict(SMALL, attention_head_dim=32), SCHEDULER, "more than one attention head"),
        (dict(SMALL, flip_sin_to_cos=True), SCHEDULER, "flip_sin_to_cos true"),
        (dict(SMALL, freq_shift=0), SCHEDULER, "freq_shift 0"),
        (dict(SMALL, resnet_time_scale_shift="scale_shift"), SCHEDULER, "resnet_time_scale_shift scale_shift"),
        (dict(SMALL, norm_num_groups=16), SCHEDULER, "norm_num_groups 16"),
        (dict(SMALL, block_out_channels=[64, 64]), SCHEDULER, "norm_num_groups 32: ddpm.py's U-Net builds [16, 32]"),
        (SMALL, dict(SCHEDULER, prediction_type="flow"), "prediction_type flow"),
        (SMALL, dict(SCHEDULER, variance_type="learned_range"), "(learned)"),
        (SMALL, dict(SCHEDULER, beta_schedule="scaled_linear"), "beta_schedule scaled_linear"),
        (SMALL, dict(SCHEDULER, beta_end=0.03), "linear betas 0.0001 → 0.03"),
        (SMALL, dict(SCHEDULER, clip_sample=False), "clip_sample false"),
    ]
    for i, (config, scheduler, message) in enumerate(cases):  # refused before any weights are read: none written
        folder = tmp_path / f"case{i}"
        (folder / "unet").mkdir(parents=True)
        (folder / "scheduler").mkdir()
        (folder / "unet" / "config.json").write_text(json.dumps(dict(config, _class_name="UNet2DModel")))
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
        folder = str(folder)
        code, err = run_main(["sample", "--ckpt", folder, "--n", "1", "--steps", "1"], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, (message, err)
    code, err = run_main(["sample", "--ckpt", "google/ddpm-cifar10-32", "--n", "1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "could not fetch it from the Hugging Face hub" in err
    bundled = os.path.join(os.path.dirname(ddpm.__file__), "samples", "cifar10_small.pt")
    code, err = run_main(["export", "--ckpt", bundled, "--out", str(tmp_path / "x"), "--format", "diffusers"], capsys)
    assert code == 2 and err.count("\n") == 1 and "one norm_num_groups for the whole network" in err
    assert not os.path.exists(tmp_path / "x") and not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_without_diffusers_its_paths_are_one_line(tmp_path, monkeypatch, capsys):
    folder = save_pipeline(tmp_path, SMALL)
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)  # as if it were not installed
    code, err = run_main(["sample", "--ckpt", folder, "--n", "1", "--steps", "1"], capsys)
    assert code == 2 and err.count("\n") == 1 and "needs diffusers: pip install diffusers" in err
    bundled = os.path.join(os.path.dirname(ddpm.__file__), "samples", "cifar10_small.pt")
    code, err = run_main(["export", "--ckpt", bundled, "--out", str(tmp_path / "d"), "--format", "diffusers"], capsys)
    assert code == 2 and err.count("\n") == 1 and "needs diffusers: pip install diffusers" in err


def test_a_damaged_folder_is_one_line_that_names_the_file_and_diffusers_prints_nothing(tmp_path, capsys):
    def damaged(name, damage):
        folder = save_pipeline(tmp_path, SMALL, name=name)
        damage(folder)
        return folder

    def write(path, text):
        with open(path, "w") as f:
            f.write(text)

    def truncate(folder):
        path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    def other_shape(folder):
        random_unet(dict(SMALL, block_out_channels=[128, 256])).save_pretrained(tmp_path / "other")
        os.replace(tmp_path / "other" / "diffusion_pytorch_model.safetensors",
                   os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    unet_config = os.path.join("unet", "config.json")
    cases = [
        (lambda f: write(os.path.join(f, unet_config), "{not json"), f"{unet_config}: not JSON"),
        (lambda f: write(os.path.join(f, unet_config), '{"_class_name": "UNet2DModel"}'),
         f"{unet_config}: sample_size is None: missing"),
        (lambda f: write(os.path.join(f, unet_config), json.dumps(dict(SMALL, layers_per_block="1"))),
         f"{unet_config}: layers_per_block is '1': missing, or not what"),
        (lambda f: write(os.path.join(f, "scheduler", "scheduler_config.json"), "[1, 2]"),
         "scheduler_config.json: a JSON list, not the object of a config"),
        (lambda f: write(os.path.join(f, "scheduler", "scheduler_config.json"), '{"beta_end": "0.02"}'),
         "scheduler_config.json: beta_end is '0.02', not a number"),
        (lambda f: os.remove(os.path.join(f, "unet", "diffusion_pytorch_model.safetensors")),
         "unet: no weights file (diffusion_pytorch_model.safetensors or .bin)"),
        (truncate, "diffusion_pytorch_model.safetensors: truncated, or weights of another shape"),
        (other_shape, "diffusion_pytorch_model.safetensors: truncated, or weights of another shape"),
    ]
    for i, (damage, message) in enumerate(cases):
        folder = damaged(f"case{i}", damage)
        code, err = run_main(["sample", "--ckpt", folder, "--n", "1", "--steps", "1", "--out",
                              str(tmp_path / "o.png")], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, (message, err)
        assert err.startswith("ddpm.py: error: " + folder)  # the file's own path, and nothing of diffusers' own
    assert not os.path.exists(tmp_path / "o.png")


def test_a_folder_without_a_scheduler_samples_with_hos_schedule_and_says_so(tmp_path, capsys):
    folder = save_pipeline(tmp_path, SMALL)
    shutil.rmtree(os.path.join(folder, "scheduler"))
    code, err = run_main(["sample", "--ckpt", folder, "--n", "1", "--steps", "1", "--out", str(tmp_path / "o.png")],
                         capsys)
    note = f"note: no {folder}/scheduler/scheduler_config.json: Ho et al.'s schedule assumed (linear β 1e-4 → 0.02"
    assert code == 0 and err.count(note) == 1 and err.count("note:") == 1
    cfg = sampling.load_checkpoint(folder)["config"]
    assert (cfg["timesteps"], cfg["schedule"], cfg["variance"]) == (1000, "linear", "fixedlarge")


def test_a_16_by_32_model_exports_with_sample_size_h_w_and_ddpm_pipeline_samples_that(tmp_path, capsys):
    model = exported(tmp_path, capsys, attn_res=(8,), image_size=(16, 32), timesteps=50, variance="fixedlarge")
    pipe = diffusers.DDPMPipeline.from_pretrained(str(tmp_path / "d"), low_cpu_mem_usage=False)
    assert list(pipe.unet.config.sample_size) == [16, 32]
    x, t = torch.randn(2, 3, 16, 32), torch.tensor([0, 30])
    with torch.no_grad():
        assert (pipe.unet(x, t).sample - model(x, t)).abs().max() <= 1e-4   # attention at 8: the 8×16 level
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 32, 3)
    back = sampling.load_checkpoint(str(tmp_path / "d"))["config"]
    assert back["image_size"] == (16, 32) and tuple(back["attn_res"]) == (8,)


def test_a_diffusers_export_keeps_the_models_eta_and_the_folders_permissions(tmp_path, capsys):
    """An exported model samples as its checkpoint does (train --eta rides in unet/config.json's "_ddpm_eta"), a
    damaged "_ddpm_eta" is one line, and every exported file has the permissions the folder's other files have."""
    exported(tmp_path, capsys, attn_res=(), image_size=8, timesteps=20, eta=1.0)
    modes = {os.stat(os.path.join(f, n)).st_mode for f, _, names in os.walk(tmp_path / "d") for n in names}
    assert len(modes) == 1, modes  # the weights too (safetensors writes them 0600)
    assert sampling.load_checkpoint(str(tmp_path / "d"))["config"]["eta"] == 1.0
    code, err = run_main(["sample", "--ckpt", str(tmp_path / "d"), "--n", "1", "--out", str(tmp_path / "s.png")], capsys)
    assert code == 0 and "DDIM 20 steps, eta 1.0" in err  # the model's η picks the sampler, as its checkpoint's does
    path = tmp_path / "d" / "unet" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), _ddpm_eta="high")))
    code, err = run_main(["sample", "--ckpt", str(tmp_path / "d"), "--n", "1", "--out", str(tmp_path / "t.png")], capsys)
    assert code == 2 and err.count("\n") == 1 and "_ddpm_eta is 'high', not a number in [0, 1]" in err
