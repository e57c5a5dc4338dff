"""Tests for ddpm_tool/trainer.py: exact resume, fine-tuning, the finite check, signals and the run folder's lock,
two processes under torchrun, micro-batches, activation checkpointing and a full disk while training."""
import errno, glob, importlib, multiprocessing, os, re, shutil, signal, socket, subprocess, sys, threading, time

import pytest
import torch
from PIL import Image
from tqdm import tqdm

import ddpm
from ddpm_tool import cli, data, runs, trainer
from conftest import HERE, ONE_STEP, TINY, WIDE, differing, run_main


def test_the_paper_model_on_a_cpu_says_it_is_sized_for_a_gpu(folder, tmp_path, monkeypatch, capsys):
    t, _ = _trainer_of(["train", "--data", folder, "--image-size", "8", "--batch-size", "1", "--steps", "1",
                        "--sample-every", "0", "--out", str(tmp_path / "run")], monkeypatch, capsys)
    t.announce()  # what run() says first (not its step: saving the 35.7M-parameter run writes 0.6 GB)
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "U-Net is sized for a GPU" in err and "--preset small" in err
    assert "training 34.43M-parameter U-Net on 6 images (2 classes)" in err  # at 8 px: no attention at 16 px


# ---------------------------------------------------------------------------------------------- training loop
def test_exact_resume_is_bitwise_identical(folder, tmp_path, capsys):
    """Every option of the loss at once (each is restored from the checkpoint): one run, not one a flag."""
    options, saved = ["--loss", "huber", "--prediction", "v", "--snr-gamma", "5"], dict(loss="huber", prediction="v",
                                                                                         snr_gamma=5)
    args = ["train", "--data", folder, "--steps", "6", "--dropout", "0.3", "--p-uncond", "0.5", "--keep-every", "2",
            *TINY, "--batch-size", "5", *options]            # batches of 5 over 6 images straddle epochs
    assert cli.main(args + ["--out", str(tmp_path / "straight")]) == 0
    half = args + ["--out", str(tmp_path / "resumed")]
    assert cli.main([*half[:half.index("--steps") + 1], "3", *half[half.index("--steps") + 2:]]) == 0
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "resumed"), "--steps", "6"]) == 0
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("straight", "resumed"))
    assert a["step"] == b["step"] == 6 and b["ema"]["num_updates"] == 6
    assert saved.items() <= a["config"].items() and saved.items() <= b["config"].items()
    assert not differing(a, b, ("model", "optimizer"))
    assert all(torch.equal(a["ema"]["model"][k], v) for k, v in b["ema"]["model"].items())
    assert sorted(f for f in os.listdir(tmp_path / "straight") if f.startswith("ckpt_")) == \
        ["ckpt_00000002.pt", "ckpt_00000004.pt", "ckpt_00000006.pt"]
    capsys.readouterr()


def _trainer_of(argv, monkeypatch, capsys):
    """The Trainer that `train` builds for argv, before its first step (run() is not called)."""
    built = []
    monkeypatch.setattr(trainer.Trainer, "run", lambda self: built.append(self) or 0)
    code, err = run_main(argv, capsys)
    assert code == 0, err
    return built[0], err


def test_init_starts_from_the_ema_weights_of_a_checkpoint_or_an_export_with_all_else_new(ckpts, folder, tmp_path,
                                                                                         monkeypatch, capsys):
    exported = str(tmp_path / "m.pt")
    runs.export_model(runs.read_checkpoint(ckpts["cond"]), exported)
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
    assert cli.main([*base, "--steps", "2", "--out", str(tmp_path / "straight")]) == 0
    assert cli.main([*base, "--steps", "1", "--out", str(tmp_path / "resumed")]) == 0
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "resumed"), "--steps", "2"]) == 0
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("straight", "resumed"))
    assert all(torch.equal(a["model"][k], v) for k, v in b["model"].items())
    assert dict(a["config"], out=None) == dict(b["config"], out=None) and a["config"]["init"] == exported
    capsys.readouterr()


def test_init_keeps_what_its_weights_predict_unless_told(ckpts, folder, tmp_path, monkeypatch, capsys):
    source = torch.load(ckpts["cond"], weights_only=True)
    source["config"]["prediction"] = "v"
    torch.save(source, tmp_path / "v.pt")
    run = ["train", "--data", folder, "--batch-size", "4", "--sample-every", "0", "--init", str(tmp_path / "v.pt")]
    for flags, prediction in [([], "v"), (["--prediction", "x0"], "x0")]:
        t, _ = _trainer_of([*run, *flags, "--out", str(tmp_path / prediction)], monkeypatch, capsys)
        assert t.cfg["prediction"] == t.diffusion.prediction == prediction


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
    assert cli.main(["train", "--data", folder, "--out", out, "--steps", "2", *TINY]) == 0
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    ckpt["rng"] = ckpt["rng"]["ranks"][0]            # as saved before multi-process training: {"cpu", "cuda"}
    torch.save(ckpt, os.path.join(out, "ckpt.pt"))
    assert cli.main(["train", "--resume", "--out", out, "--steps", "3"]) == 0
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 3
    capsys.readouterr()


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


# ---------------------------------------------------------------------------------------------- signals (subprocesses)
def _main_in_child(argv, err):
    with open(err, "w", buffering=1) as f:  # stderr into a file the test reads
        sys.stderr = f
        os.dup2(f.fileno(), 2)
        torch.set_num_threads(1)  # OpenMP's threads do not survive a fork
        sys.exit(cli.main(argv))


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
    # A lock of its own for tqdm: fork shares the parent's (a multiprocessing semaphore), and a child killed while it
    # holds it (test_a_process_that_dies_…) would leave the parent's next progress bar waiting for ever.
    tqdm.set_lock(threading.RLock())
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.exit(cli.main(argv))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(argv, world=2):
    """cli.main(argv) in `world` forked processes that meet over gloo on 127.0.0.1, as torchrun would start them."""
    port = _free_port()
    procs = [multiprocessing.get_context("fork").Process(target=_ddp_process, args=(r, world, port, argv))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    return [p.exitcode for p in procs]


def test_two_processes_take_the_same_step_as_one(folder, one_step, tmp_path, capsys):
    args = [*ONE_STEP, "--data", folder]
    report = ["--report-to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []
    # and with activation checkpointing under DDP: the same step (it changes memory, not results)
    assert run_ddp(args + ["--out", str(tmp_path / "two"), *report, "--grad-checkpoint"]) == [0, 0]
    assert len(glob.glob(str(tmp_path / "two" / "tensorboard" / "*"))) == len(report) // 2  # rank 0's events only
    a, b = (torch.load(r / "ckpt.pt", weights_only=True) for r in (one_step, tmp_path / "two"))
    for key, value in a["model"].items():
        assert torch.allclose(b["model"][key], value, rtol=1e-5, atol=1e-8), key
    for i, state in a["optimizer"]["state"].items():   # Adam's first moment is 0.1 × the (averaged) gradient
        grad_a, grad_b = state["exp_avg"], b["optimizer"]["state"][i]["exp_avg"]
        assert (grad_a - grad_b).norm() <= 1e-5 * grad_a.norm() + 1e-12, i
    capsys.readouterr()


def test_micro_batches_accumulate_the_gradient_of_the_whole_batch_in_one_process_and_in_two(folder, one_step, tmp_path,
                                                                                          capsys):
    args = [*ONE_STEP, "--data", folder]                                                     # one_step: batch 4 at once
    assert cli.main(args + ["--micro-batch", "1", "--out", str(tmp_path / "micro")]) == 0    # 4 parts of 1
    assert run_ddp(args + ["--micro-batch", "1", "--out", str(tmp_path / "two")]) == [0, 0]   # 2 processes × 2 parts
    folders = (one_step, tmp_path / "micro", tmp_path / "two")
    runs = [torch.load(r / "ckpt.pt", weights_only=True) for r in folders]
    logs = [re.search(r"loss (\S+)", (r / "log.txt").read_text())[1] for r in folders]
    for other in runs[1:]:
        for i, state in runs[0]["optimizer"]["state"].items():  # Adam's first moment: 0.1 × the gradient
            grad, got = state["exp_avg"], other["optimizer"]["state"][i]["exp_avg"]
            assert (grad - got).norm() <= 1e-5 * grad.norm() + 1e-12, i
        assert all(torch.allclose(other["model"][k], v, rtol=1e-5, atol=1e-8) for k, v in runs[0]["model"].items())
    assert logs[0] == logs[1] == logs[2]  # the loss of the whole batch, to the 5 digits logged
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


def test_sigterm_to_torchrun_stops_every_process_after_the_same_step_and_two_processes_resume_it_bitwise(folder,
                                                                                                        tmp_path):
    """ddpm.py as torchrun runs it: as a script, in two processes; then resumed for a step in two processes, equal to
    a run of as many steps straight, bit for bit (its model, Adam, EMA and every process's random state)."""
    out, root = str(tmp_path / "run"), str(tmp_path / "root")
    data.load_images(folder, root, 16, cache=True)  # decoded once here: the workers map it (no torchvision import)
    args = ["train", "--data", folder, "--data-root", root, "--dropout", "0.3", "--p-uncond", "0.5", *TINY]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen([*torchrun, os.path.join(HERE, "ddpm.py"), *args, "--out", out, "--steps", "100000",
                             "--save-every", "1", "--log-every", "100000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, TMPDIR=str(tmp_path)))  # torchrun's own folder, which a signal leaves
    _wait_for(os.path.join(out, "ckpt.pt"), lambda: proc.poll() is None)  # training: its first step is saved
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    step = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"]
    assert f"interrupted at step {step}; saved" in err and err.count("interrupted at step") == 1, err
    assert len(workers) == 2 and not _children(proc.pid)
    assert all(not os.path.exists(f"/proc/{w}") for w in workers) and not any(".tmp" in f for f in os.listdir(out))
    assert run_ddp(["train", "--resume", "--out", out, "--steps", str(step + 1)]) == [0, 0]
    assert run_ddp([*args, "--out", str(tmp_path / "straight"), "--steps", str(step + 1)]) == [0, 0]
    a, b = (torch.load(os.path.join(r, "ckpt.pt"), weights_only=True) for r in (tmp_path / "straight", out))
    assert a["step"] == b["step"] == step + 1 and len(b["rng"]["ranks"]) == 2
    assert not differing(a, b, ("model", "optimizer", "ema", "rng"))


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


def test_a_resumed_run_whose_data_went_away_says_how_to_go_on(folder, tmp_path, capsys):
    shutil.copytree(folder, tmp_path / "d")
    out = str(tmp_path / "run")
    assert cli.main(["train", "--data", str(tmp_path / "d"), "--out", out, "--steps", "1", *TINY]) == 0
    shutil.rmtree(tmp_path / "d")
    capsys.readouterr()
    code, err = run_main(["train", "--resume", "--out", out, "--steps", "2"], capsys)
    assert code == 2 and err.count("\n") == 1 and "no such folder" in err
    assert f"{out}/ckpt.pt of step 1 is whole: pass --data with --resume" in err


def test_grad_checkpoint_trains_the_same_bits_also_with_micro_batches_and_a_resume_may_turn_it_on(banners,
                                                                                                   tmp_path):
    runs = {}
    for name, extra in [("plain", []), ("checkpointed", ["--grad-checkpoint"]),
                        ("both", ["--grad-checkpoint", "--micro-batch", "2"])]:
        out = str(tmp_path / name)
        assert cli.main(["train", "--data", banners, "--out", out, "--steps", "2", "--dropout", "0.2", *WIDE,
                          *extra]) == 0
        runs[name] = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    plain = runs["plain"]["model"]
    assert all(torch.equal(plain[k], runs["checkpointed"]["model"][k]) for k in plain)
    both = runs["both"]["model"]  # micro-batches sum the gradient in another order: equal to rounding
    assert all(torch.allclose(plain[k], both[k], atol=1e-6) for k in plain)
    assert runs["checkpointed"]["config"]["grad_checkpoint"] is True
    assert cli.main(["train", "--resume", "--out", str(tmp_path / "plain"), "--steps", "3",
                      "--grad-checkpoint"]) == 0  # memory, not results: a resume may change it
