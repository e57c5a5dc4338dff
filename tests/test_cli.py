"""Tests for ddpm_tool/cli.py: every command's help, output and refusals (one line, exit 2), non-square models
through every command, and ddpm.py's own command line (alone, and without each optional package)."""
import glob, os, sys

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from ddpm_tool import cli, data, runs
from conftest import TINY, WIDE, grey_run, run_main


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tmp_path, monkeypatch, capsys):
    def offline(root, *a, **k):  # torchvision makes its root, then fails to download
        os.makedirs(root, exist_ok=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")
    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    for source in ["cifar10", str(tmp_path / "nowhere")]:
        code, err = run_main(["train", "--data", source, "--out", str(tmp_path / "run"), "--data-root",
                              str(tmp_path / "downloads")], capsys)
        assert code == 2 and err.count("\n") == 1 and not os.path.exists(tmp_path / "run"), err
        assert not os.path.exists(tmp_path / "downloads")  # the download folder it made: gone again


def test_existing_run_is_never_overwritten_without_resume(ckpts, folder, capsys):
    before = open(ckpts["cond"], "rb").read()
    out = os.path.dirname(ckpts["cond"])
    code, err = run_main(["train", "--data", folder, "--out", out, "--steps", "3", *TINY], capsys)
    assert code == 2 and "--resume" in err and open(ckpts["cond"], "rb").read() == before


# ---------------------------------------------------------------------------------------------- command line
def test_sample_cli_writes_grids_and_per_image_files(ckpts, tmp_path, capsys):
    grid = str(tmp_path / "ship.png")
    assert cli.main(["sample", "--ckpt", ckpts["cond"], "--class", "ship", "--n", "4", "--steps", "5",
                      "--out", grid]) == 0
    assert Image.open(grid).size == (2 * 17 + 1, 2 * 17 + 1)                # 2×2 grid of 16-px images, 1-px padding
    assert cli.main(["sample", "--ckpt", ckpts["cond"], "--n", "4", "--steps", "3",
                      "--out", str(tmp_path / "all.png")]) == 0
    assert Image.open(tmp_path / "all.png").size == (2 * 17 + 1, 2 * 17 + 1)   # one row per class, 2 per row
    assert cli.main(["sample", "--ckpt", ckpts["uncond"], "--n", "3", "--steps", "2", "--batch-size", "2",
                      "--out", str(tmp_path / "each") + "/"]) == 0
    assert sorted(os.listdir(tmp_path / "each")) == ["000000.png", "000001.png", "000002.png"]
    capsys.readouterr()


def test_every_command_has_help(capsys):
    # ddpm.py itself runs as a script in test_sigterm_to_torchrun_stops_every_process_after_the_same_step
    with pytest.raises(SystemExit) as exit:
        cli.main(["--help"])
    commands = "{train,sample,inpaint,interpolate,img2img,upscale,colorize,fid,nll,export,forward}"  # the README's order
    assert exit.value.code == 0 and commands in capsys.readouterr().out
    for command in ("train", "sample", "inpaint", "interpolate", "img2img", "upscale", "colorize", "fid", "nll", "export",
                    "forward"):
        with pytest.raises(SystemExit) as exit:
            cli.main([command, "--help"])
        assert exit.value.code == 0 and f"usage: ddpm.py {command}" in capsys.readouterr().out


def _bad_inputs(ckpts, folder, tmp):
    os.makedirs(tmp / "empty" / "cls")
    os.makedirs(tmp / "broken" / "cls")
    (tmp / "broken" / "cls" / "x.png").write_bytes(b"\x89PNG garbage")
    (tmp / "afile").write_text("")
    c, u = ckpts["cond"], ckpts["uncond"]
    os.makedirs(tmp / "exported")
    runs.export_model(runs.read_checkpoint(c), str(tmp / "exported" / "ckpt.pt"))
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
                                   "each side must be a multiple of 4; the nearest: 16 or 20\n"),  # one side, said once
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


def test_sample_writes_into_outputs_not_into_the_repos_samples(ckpts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["sample", "--ckpt", ckpts["cond"], "--class", "cat", "--n", "1", "--steps", "1"], capsys)
    assert code == 0 and os.listdir(tmp_path) == ["outputs"] and os.listdir(tmp_path / "outputs") == ["cat.png"]
    code, err = run_main(["sample", "--ckpt", ckpts["cond"], "--class", "1", "--n", "1", "--steps", "1"], capsys)
    assert code == 0 and sorted(os.listdir(tmp_path / "outputs")) == ["cat.png", "ship.png"]  # a class by its index


@pytest.mark.chart
def test_optional_packages_are_imported_where_used_and_without_one_a_command_names_what_to_install(folder, ckpts,
                                                                                                  tmp_path, monkeypatch,
                                                                                                  capsys):
    import ast
    optional = {"torch_fidelity", "matplotlib", "diffusers", "tensorboard", "wandb"}
    for path in glob.glob(os.path.join(os.path.dirname(cli.__file__), "*.py")):  # none at the top of a module
        tree = ast.parse(open(path).read())
        top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        assert not top & optional, (path, top & optional)
    for name in ["torch_fidelity", "matplotlib", *[m for m in sys.modules if m.split(".")[0] in ("torch_fidelity",
                                                                                                 "matplotlib")]]:
        monkeypatch.setitem(sys.modules, name, None)  # as if neither were installed: importing them fails
    run = tmp_path / "run"
    code, err = run_main(["train", "--data", folder, "--out", str(run), "--steps", "2", "--log-every", "1", *TINY],
                         capsys)
    assert code == 0 and err.count("progress.png needs matplotlib: pip install matplotlib") == 1
    assert sorted(os.listdir(run)) == [".lock", "ckpt.pt", "log.txt"]
    code, err = run_main(["sample", "--ckpt", str(run / "ckpt.pt"), "--n", "2", "--steps", "2", "--out",
                          str(tmp_path / "s.png")], capsys)
    assert code == 0 and Image.open(tmp_path / "s.png").size == (18, 35)  # a row per class, one sample each
    for argv, needs in [(["fid", "--ckpt", ckpts["cond"], "--ref", folder], "fid needs torch_fidelity"),
                        (["forward", "--data", folder, "--out", str(tmp_path / "q.png")], "forward needs matplotlib"),
                        (["train", "--data", folder, "--out", str(tmp_path / "f"), "--fid-every", "1", *TINY],
                         "train needs torch_fidelity")]:
        code, err = run_main([*argv, "--data-root", str(tmp_path)] if argv[0] == "fid" else argv, capsys)
        name = needs.split()[-1]
        assert code == 2 and err.count("\n") == 1 and f"{needs}: pip install {name.replace('_', '-')}" in err, err
    assert not os.path.exists(tmp_path / "f") and not os.path.exists(tmp_path / "q.png")


def test_a_16_by_32_run_trains_resumes_bitwise_and_every_command_follows_its_size(banners, tmp_path, capsys,
                                                                                fake_inception, monkeypatch):
    monkeypatch.chdir(tmp_path)  # img2img and interpolate write into outputs/ here, not the repository's
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert cli.main(["train", "--data", banners, "--out", straight, "--steps", "4", *WIDE]) == 0
    assert cli.main(["train", "--data", banners, "--out", resumed, "--steps", "2", *WIDE]) == 0
    assert cli.main(["train", "--resume", "--out", resumed, "--steps", "4"]) == 0
    a = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(resumed, "ckpt.pt"), weights_only=True)
    assert a["config"]["image_size"] == (16, 32) and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ckpt = os.path.join(straight, "ckpt.pt")
    capsys.readouterr()
    code, err = run_main(["sample", "--ckpt", ckpt, "--n", "2", "--steps", "2", "--out", f"{tmp_path}/s/"], capsys)
    assert code == 0 and [Image.open(tmp_path / "s" / f).size for f in sorted(os.listdir(tmp_path / "s"))] == \
        [(32, 16)] * 2, err                                                       # PIL: width × height
    mask = np.zeros((16, 32), np.uint8)
    mask[4:12, 8:24] = 255                                                      # white: painted
    Image.fromarray(mask).save(tmp_path / "mask.png")
    image = os.path.join(banners, "sky", "0.png")
    code, err = run_main(["inpaint", image, "--ckpt", ckpt, "--mask", str(tmp_path / "mask.png"), "--n", "1",
                          "--steps", "2", "--out", f"{tmp_path}/i/"], capsys)
    assert code == 0, err
    written = np.asarray(Image.open(tmp_path / "i" / "000000.png"))
    expected = np.asarray(data.resize_crop(Image.open(image).convert("RGB"), (16, 32)))
    assert written.shape == (16, 32, 3) and np.array_equal(written[mask == 0], expected[mask == 0])
    for argv in (["img2img", image, "--strength", "0.5", "--n", "1"], ["interpolate", "--frames", "2"],
                 ["fid", "--n", "4"], ["nll", "--data", banners, "--n", "2", "--t-samples", "2"]):
        code, err = run_main([*argv, "--ckpt", ckpt, *([] if argv[0] == "nll" else ["--steps", "2"])], capsys)
        assert code == 0, (argv, err)


def test_flags_are_checked_at_parsing_and_out_before_any_work(ckpts, folder, tmp_path, monkeypatch, capsys):
    """An empty list, or an --out that is neither NAME.png nor a folder/ nor writable: one line, and the model is
    never loaded (Diffusion.sample would raise)."""
    monkeypatch.setattr(ddpm.Diffusion, "sample", lambda *a, **k: pytest.fail("sampled"))
    (tmp_path / "afile").write_text("")
    image = os.path.join(folder, "cat", "1.png")
    for argv, needle in [(["img2img", image, "--strength", ""], "no number"),
                         (["img2img", image, "--strength", ","], "no number"),
                         (["train", "--data", folder, "--ch-mult", ""], "no number"),
                         (["sample", "--out", str(tmp_path / "precious.txt")], "write a PNG (NAME.png), or a folder/"),
                         (["sample", "--out", str(tmp_path / "noext")], "write a PNG"),
                         (["inpaint", image, "--out", str(tmp_path / "afile" / "x.png")], "cannot write into"),
                         (["forward", "--data", folder, "--out", str(tmp_path / "f.jpg")], "write a PNG")]:
        code, err = run_main([*argv, "--ckpt", ckpts["cond"]] if argv[0] != "train" else argv, capsys)
        assert code == 2 and err.count("\n") == 1 and needle in err and ".tmp" not in err, (argv, err)
    assert sorted(os.listdir(tmp_path)) == ["afile"]


def test_n_means_n_in_a_folder_and_a_grid_says_how_it_rounds(ckpts, tmp_path, capsys):
    code, err = run_main(["sample", "--ckpt", ckpts["cond"], "--n", "3", "--steps", "1", "--out",
                          f"{tmp_path}/each/"], capsys)
    assert code == 0 and len(os.listdir(tmp_path / "each")) == 3 and "note" not in err  # the classes in turn
    code, err = run_main(["sample", "--ckpt", ckpts["cond"], "--n", "3", "--steps", "1", "--out",
                          str(tmp_path / "grid.png")], capsys)
    assert code == 0 and "note: --n 3 makes a grid of 4, 2 of each class, a row each" in err and "wrote 4 samples" in err
    code, err = run_main(["sample", "--ckpt", ckpts["uncond"], "--n", "1", "--steps", "1", "--out",
                          str(tmp_path / "one.png")], capsys)
    assert code == 0 and "wrote 1 sample (DDIM 1 steps, eta 0.0, fp32)" in err  # no guidance for an unconditional model


def test_what_does_nothing_says_so_and_export_keeps_what_sampling_needs(ckpts, folder, tmp_path, capsys):
    image = os.path.join(folder, "cat", "1.png")
    for value, what in [(0, "paints nothing: the results are the inputs"), (255, "paints everything: it is plain")]:
        Image.new("L", (16, 16), value).save(tmp_path / f"mask{value}.png")
        code, err = run_main(["inpaint", image, "--ckpt", ckpts["cond"], "--mask", str(tmp_path / f"mask{value}.png"),
                              "--n", "1", "--steps", "1", "--out", str(tmp_path / f"i{value}.png")], capsys)
        assert code == 0 and f"note: --mask {tmp_path}/mask{value}.png {what}" in err and "wrote 1 result of" in err
    os.makedirs(tmp_path / "one" / "c")
    Image.new("RGB", (16, 16)).save(tmp_path / "one" / "c" / "0.png")
    code, err = run_main(["nll", "--ckpt", ckpts["cond"], "--data", str(tmp_path / "one")], capsys)
    assert code == 2 and err.count("\n") == 1 and "one image; the bound's standard error needs at least 2" in err
    code, err = run_main(["export", "--ckpt", ckpts["cond"], "--keep-classes", "--out", str(tmp_path / "x.pt")],
                         capsys)
    assert code == 2 and "--keep-classes is for --format diffusers" in err and not os.path.exists(tmp_path / "x.pt")
    code, err = run_main(["train", "--data", str(tmp_path / "one"), "--out", str(tmp_path / "run"), "--steps", "1",
                          *TINY], capsys)  # the wording of the table's row 12
    assert code == 0 and "U-Net on 1 image (1 class) on cpu" in err
    Image.new("L", (9, 9)).save(tmp_path / "mask9.png")
    code, err = run_main(["inpaint", image, "--ckpt", ckpts["cond"], "--mask", str(tmp_path / "mask9.png")], capsys)
    assert code == 2 and "9×9 pixels; it must be 16×16 (width × height)" in err  # not "16×16 or 16×16"
