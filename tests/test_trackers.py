"""Tests for ddpm_tool/trackers.py: TensorBoard and W&B leave training bit for bit as it was, a resume continues
them, and a tracker that is not installed is one line."""
import glob, importlib, json, os, re, shutil, struct, sys

import pytest
import torch
from PIL import Image

from ddpm_tool import cli, trainer
from conftest import DRAW_PROGRESS, TINY, differing, run_main


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
    assert cli.main([*args, "--out", str(plain)]) == 0
    assert cli.main([*args, "--out", str(out), "--fid-every", "2", "--fid-n", "5", "--keep-every", "2",
                      "--sample-every", "4", "--report-to", "tensorboard,wandb"]) == 0
    shutil.copy(out / "ckpt.pt", tmp_path / "first.pt")
    shutil.copy(out / "ckpt_00000002.pt", out / "ckpt.pt")  # as if it had died at step 4, its last checkpoint step 2
    monkeypatch.setattr(trainer.Trainer, "draw_progress", DRAW_PROGRESS)  # the chart looked at: the resumed run's
    assert cli.main(["train", "--resume", "--out", str(out)]) == 0
    paths = (plain / "ckpt.pt", tmp_path / "first.pt", out / "ckpt.pt")
    ckpts = [torch.load(path, weights_only=True) for path in paths]
    for other in ckpts[1:]:  # FID, previews and trackers draw nothing from training's random streams
        assert not differing(ckpts[0], other, ("model", "optimizer", "ema"))
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
