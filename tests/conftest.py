"""What the test files in tests/ share: a tiny network's flags, the command line in-process, a folder of images, two
trained checkpoints, non-square ones, and a stand-in for Inception; the exact-ε oracle and random weights come from
test_ddpm.py, the method's tests. Every test runs on the CPU and downloads nothing."""
import os
import shutil

import pytest
import torch
from PIL import Image

from ddpm_tool import cli, runs, trainer
from test_ddpm import Oracle, randomize  # noqa: F401 (for the test files)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: ddpm.py, samples/
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TINY = ["--image-size", "16", "--ch", "16", "--ch-mult", "1,2", "--num-res-blocks", "1", "--attn-res", "8",
        "--timesteps", "50", "--batch-size", "4", "--sample-every", "0", "--num-workers", "1"]


def differing(a, b, parts):
    """The parts of checkpoint a that b does not hold bit for bit (tensors by torch.equal, the rest by ==) → a list."""
    out = []
    for part in parts:
        flat_a, flat_b = (torch.utils._pytree.tree_flatten(c[part])[0] for c in (a, b))
        pairs = zip(flat_a, flat_b)
        same = all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in pairs)
        if not same or len(flat_a) != len(flat_b):
            out.append(part)
    return out


def run_main(argv, capsys):
    """The command line (ddpm.py's) in-process → (exit code, stderr). argparse errors count as their SystemExit code."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="session", autouse=True)
def data_root(tmp_path_factory):
    """train's --data-root (downloads) and the caches ($DDPM_CACHE) in temporary folders, not ./data of wherever pytest
    runs, nor the user's ~/.cache/ddpm."""
    root = runs.DEFAULTS["data_root"]
    runs.DEFAULTS["data_root"] = str(tmp_path_factory.mktemp("data"))
    cache = os.environ.get("DDPM_CACHE")
    os.environ["DDPM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield runs.DEFAULTS["data_root"]
    runs.DEFAULTS["data_root"] = root
    os.environ.pop("DDPM_CACHE")
    if cache is not None:
        os.environ["DDPM_CACHE"] = cache


@pytest.fixture(scope="session", autouse=True)
def each_file_unpickled_once():
    """torch.load(path, weights_only=True) of a file unchanged since a load (same inode, size and mtime) gives a copy
    of that load's content: the ckpts fixture's checkpoint alone is read by ~60 commands, each 50 ms in the
    weights-only unpickler (Python), 3 s a session. A first read, a file written since, an error: torch.load's own."""
    real, loaded = torch.load, {}

    def load(f, *args, **kwargs):
        try:
            stat = os.stat(f)
        except (OSError, TypeError):  # not a path, or none there
            return real(f, *args, **kwargs)
        if args or not kwargs.get("weights_only") or stat.st_size > 2 ** 24:
            return real(f, *args, **kwargs)
        key = (os.path.abspath(f), stat.st_ino, stat.st_size, stat.st_mtime_ns, repr(sorted(kwargs.items())))
        if key not in loaded:
            loaded[key] = real(f, **kwargs)
        return torch.utils._pytree.tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, loaded[key])
    torch.load = load
    yield
    torch.load = real


DRAW_PROGRESS = trainer.Trainer.draw_progress


@pytest.fixture(autouse=True)
def progress_chart(request, monkeypatch):
    """train draws progress.png at each log line (matplotlib: ~0.08 s, over 50 times a session): only in the tests
    marked `chart`, or from where a test sets DRAW_PROGRESS back, the ones that look at it (or at its note without
    matplotlib); test_pictures.py draws it alone."""
    if "chart" not in request.keywords:
        monkeypatch.setattr(trainer.Trainer, "draw_progress", lambda self: None)


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """Two classes of three 16×16 images each, saved as PNG and JPEG."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["cat", "ship"]):
        os.makedirs(root / name)
        for i in range(3):
            pixels = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i else 'jpg'}")
    return str(root)


@pytest.fixture(scope="session")
def one_step(folder, tmp_path_factory):
    """train's first step on folder (a conditional TINY network, no dropout or warm-up, half the labels dropped): the
    one-process reference the multi-process and micro-batch tests compare with → its run folder."""
    out = tmp_path_factory.mktemp("one_step") / "run"
    assert cli.main([*ONE_STEP, "--data", folder, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def ckpts(folder, tmp_path_factory):
    """A conditional and an unconditional checkpoint, two training steps each."""
    base = tmp_path_factory.mktemp("runs")
    paths = {}
    for kind, extra in [("cond", []), ("uncond", ["--unconditional"])]:
        out = str(base / kind)
        assert cli.main(["train", "--data", folder, "--out", out, "--steps", "2", *TINY, *extra]) == 0
        paths[kind] = os.path.join(out, "ckpt.pt")
    return paths


class FakeInception(torch.nn.Module):
    """Stands in for Inception where a test is about the plumbing: uint8 (B, 3, H, W) → (features (B, 6),)."""
    def __init__(self, seed=0):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)              # its initialisation draws from the global RNG, as Inception's
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        return (self.conv((x.float() - 128) / 128).relu().mean((2, 3)),)


@pytest.fixture
def fake_inception(monkeypatch):
    """torch-fidelity's class replaced: fid.load_inception runs as it is, around the stand-in."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    monkeypatch.delenv("DDPM_INCEPTION", raising=False)
    monkeypatch.setattr(tfi, "FeatureExtractorInceptionV3", lambda *a, **k: FakeInception().eval())


GREY = {}  # the run grey_run trains once a session, then copies


def grey_run(tmp_path):
    """A checkpoint of one step on three grey 16×16 images (tmp_path/grey, in tmp_path/run) → its path. Trained once a
    session (in the first caller's tmp_path) and copied into every later caller's."""
    if "made" in GREY:
        shutil.copytree(GREY["made"] / "grey", tmp_path / "grey")
        shutil.copytree(GREY["made"] / "run", tmp_path / "run", ignore=shutil.ignore_patterns(".lock"))
        return str(tmp_path / "run" / "ckpt.pt")
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        (tmp_path / "grey" / "c").mkdir(parents=True, exist_ok=True)
        grey = (torch.rand(16, 16, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(grey, "L").save(tmp_path / "grey" / "c" / f"{i}.png")
    assert cli.main(["train", "--data", str(tmp_path / "grey"), "--out", str(tmp_path / "run"), "--steps", "1",
                      *TINY]) == 0
    GREY["made"] = tmp_path
    return str(tmp_path / "run" / "ckpt.pt")


ONE_STEP = ["train", "--steps", "1", "--dropout", "0", "--warmup", "0", "--p-uncond", "0.5", *TINY]
WIDE = [*TINY, "--image-size", "16,32"]  # TINY's network on 16 × 32 images


@pytest.fixture(scope="session")
def banners(tmp_path_factory):
    """Two classes of three images each, 40 high and 80 wide: the aspect ratio of 16×32."""
    root = tmp_path_factory.mktemp("banners")
    g = torch.Generator().manual_seed(0)
    for name in ("sky", "sea"):
        os.makedirs(root / name)
        for i in range(3):
            Image.fromarray((torch.rand(40, 80, 3, generator=g) * 255).to(torch.uint8).numpy()).save(
                root / name / f"{i}.png")
    return str(root)
