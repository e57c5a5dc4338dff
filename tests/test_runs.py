"""Tests for ddpm_tool/runs.py: atomic saves, checkpoints read weights-only (and pickles refused), exports, and a
run's config: its defaults, presets, sizes and the keys older checkpoints lack."""
import errno, os, re, struct

import pytest
import torch
from PIL import Image

import ddpm
from ddpm_tool import cli, runs, sampling
from conftest import TINY, run_main


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
    monkeypatch.setattr(cli, "Trainer", Trainer)
    assert cli.main(["train", "--data", "imgs", "--image-size", str(size), "--unconditional"]) == 0
    assert cli.main(["train", "--data", "imgs", "--image-size", str(size), "--ch-mult", "1,2,2,2,2,2"]) == 0
    cfg, mine = cfgs
    assert tuple(cfg["ch_mult"]) == ch_mult and mine["ch_mult"] == (1, 2, 2, 2, 2, 2)  # given: kept as given
    if params:  # Ho et al. App. B: 114M parameters, and their run_celebahq.py's lr, batch and dropout
        assert (cfg["lr"], cfg["batch_size"], cfg["dropout"], cfg["attn_res"]) == (2e-5, 64, 0.0, (16,))
        with torch.device("meta"):  # counted, not allocated
            assert sum(p.numel() for p in runs.unet_from_config(dict(cfg, channels=3), None).parameters()) == params


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_with_weights_only(ckpts):
    raw = torch.load(ckpts["cond"], weights_only=True)
    assert raw["step"] == 2 and raw["classes"] == ["cat", "ship"] and raw["config"]["ch_mult"] == (1, 2)
    assert not any(k.startswith("_orig_mod") for k in raw["model"])
    run = sampling.load_run(ckpts["cond"], "cpu")
    assert run.diffusion.num_timesteps == 50 and not run.model.training
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, raw["ema"]["model"][k])


def test_atomic_save_keeps_the_old_file_when_a_save_dies(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    runs.save_atomic(path, lambda f: torch.save({"w": torch.ones(3)}, f), durable=True)

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        runs.save_atomic(path, lambda f: torch.save({"w": torch.zeros(3)}, f), durable=True)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    with pytest.raises(OSError):  # a picture whose save dies (not durable) leaves no temporary file either
        runs.save_atomic(str(tmp_path / "grid.png"), lambda f: dying_save(None, f))
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


def test_truncated_or_garbage_checkpoint_is_a_clear_error(ckpts, tmp_path, capsys):
    data = open(ckpts["cond"], "rb").read()
    for name, content in [("cut.pt", data[: len(data) // 2]), ("junk.pt", b"not a checkpoint")]:
        (tmp_path / name).write_bytes(content)
        code, err = run_main(["sample", "--ckpt", str(tmp_path / name)], capsys)
        assert code == 2 and "truncated or corrupt" in err and err.count("\n") == 1


def test_export_keeps_the_ema_weights_in_half_precision(ckpts, tmp_path):
    runs.export_model(runs.read_checkpoint(ckpts["cond"]), str(tmp_path / "m.pt"))
    full, half = (torch.load(p, weights_only=True) for p in (ckpts["cond"], tmp_path / "m.pt"))
    assert set(half) == {"config", "classes", "step", "ema"} and half["config"]["steps"] == full["step"] == 2
    for k, v in full["ema"]["model"].items():
        assert half["ema"]["model"][k].dtype == (torch.float16 if v.is_floating_point() else v.dtype)
        assert torch.allclose(half["ema"]["model"][k].to(v.dtype), v, rtol=1e-3, atol=1e-4), k
    assert os.path.getsize(tmp_path / "m.pt") < os.path.getsize(ckpts["cond"]) / 3


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
        assert cli.main(["train", "--data", str(tmp_path / "d"), "--out", out, "--steps", "2", flag, *TINY]) == 0
        assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]["flip"] == (flag == "--flip")
        assert any(mirrored()) == (flag == "--flip")
    seen.clear()
    assert cli.main(["train", "--resume", "--out", runs["--no-flip"], "--steps", "4"]) == 0 and not any(mirrored())
    code, err = run_main(["train", "--resume", "--out", runs["--no-flip"], "--steps", "6", "--flip"], capsys)
    assert code == 2 and "--flip True: the run" in err
    ckpt = torch.load(os.path.join(runs["--flip"], "ckpt.pt"), weights_only=True)
    del ckpt["config"]["flip"]                                     # a run from before the setting: flipped (not MNIST)
    torch.save(ckpt, os.path.join(runs["--flip"], "ckpt.pt"))
    seen.clear()
    assert cli.main(["train", "--resume", "--out", runs["--flip"], "--steps", "4"]) == 0 and any(mirrored())
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
        assert cli.main(["train", *common, "--preset", preset, "--ch", "8", "--out", str(out)]) == 0
        cfg = torch.load(out / "ckpt.pt", weights_only=True)["config"]
        assert cfg["image_size"] == size and cfg["flip"] is False
    capsys.readouterr()


def test_a_write_that_fails_otherwise_is_one_line_too(tmp_path):
    def broken(f):
        f.write(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4 vs 0\n")
    with pytest.raises(OSError) as e:
        runs.save_atomic(str(tmp_path / "x.pt"), broken)  # a disk with room: not called full
    assert e.value.errno == errno.EIO and os.listdir(tmp_path) == []
    assert e.value.strerror == "the write failed (RuntimeError: [enforce fail at inline_container.cc:672] . " \
                               "unexpected pos 4 vs 0)"
    with pytest.raises(TypeError):  # a bug is not a write error: it keeps its traceback
        runs.save_atomic(str(tmp_path / "x.pt"), lambda f: f.write("text"))


def test_train_help_names_what_a_resume_may_change():
    """--resume's help names exactly the flags runs.RESUMABLE lets a resumed run change (the intervals and the FID
    flags as groups)."""
    text = next(row[-1] for row in cli.TRAIN_ONLY if row[0] == "--resume")
    named = {flag[2:].replace("-", "_") for flag in re.findall(r"--[a-z-]+[a-z]", text.split("only ")[1])}
    groups = {"save_every", "keep_every", "sample_every", "log_every", "fid_every", "fid_n", "fid_ref", "inception"}
    assert "the intervals" in text and "the FID flags" in text and named | groups == runs.RESUMABLE


def test_every_value_a_config_holds_is_checked_as_its_flag_would_be(ckpts, tmp_path, capsys):
    """A checkpoint (or export, or diffusers folder) whose config holds a value its flag would refuse: one line naming
    the file and the key, for each command that reads one, never a traceback."""
    for key, value, needle in [("timesteps", -5, "-5 is outside [2, 100000]"), ("ch_mult", (), "no number"),
                               ("loss", "l3", "not one it takes"), ("unconditional", "yes", "not one it takes"),
                               ("lr", "fast", "'fast' is not a number")]:
        ckpt = torch.load(ckpts["cond"], weights_only=True)
        ckpt["config"][key] = value
        path = tmp_path / key / "ckpt.pt"
        os.makedirs(path.parent)
        torch.save(ckpt, path)
        commands = [["sample", "--ckpt", str(path), "--n", "1", "--steps", "1", "--out", str(tmp_path / "s.png")]]
        if key == "timesteps":  # each command that reads a config checks it alike: every kind through sample
            commands += [["export", "--ckpt", str(path), "--out", str(tmp_path / "e.pt")],
                         ["train", "--resume", "--out", str(path.parent)],
                         ["nll", "--ckpt", str(path), "--data", str(path.parent)]]
        for argv in commands:
            code, err = run_main(argv, capsys)
            assert code == 2 and err.count("\n") == 1 and f"{path}: its config's {key} is {value!r}" in err, err
            assert needle in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "s.png") and not os.path.exists(tmp_path / "e.pt")
