"""Tests for ddpm_tool/pictures.py alone: the grids' geometry, and that the charts draw what they are given where their axes
say (pixels read back from the rendered canvas at the points the axes map the data to)."""
import numpy as np
import torch

from ddpm_tool import pictures


def pixels(fig):
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)


def colour_near(fig, image, ax, x, y, colour, radius=1, tolerance=40):
    """Is `colour` drawn within `radius` pixels of the data point (x, y) of ax?"""
    px, py = ax.transData.transform((x, y))
    col, row = round(px), image.shape[0] - round(py)  # display coordinates run upwards
    patch = image[row - radius:row + radius + 1, col - radius:col + radius + 1]
    return bool((np.abs(patch - np.array(colour)).max(-1) <= tolerance).any())


def test_labelled_grid_and_strips_have_a_tile_per_image_and_margins_for_the_labels():
    tiles = [[torch.full((1, 8, 6), 40 * (i + j), dtype=torch.uint8) for j in range(3)] for i in range(2)]
    plain, labelled = pictures.labelled_grid(tiles), pictures.labelled_grid(tiles, ["a", "b", "c"], ["x", "y"])
    assert plain.mode == "L" and plain.size == (2 * (3 * 8 + 2), 2 * (2 * 10 + 2))  # 2-px gaps, doubled
    assert labelled.size == (plain.width + 48, plain.height + 14)
    assert np.array(plain)[2 * 2 + 1, 2 * (2 + 8) + 2 + 1] == 40  # tile (0, 1), drawn twice as large
    zeros, ones = torch.zeros(3, 3, 4, 4, dtype=torch.uint8), torch.ones(3, 3, 4, 4, dtype=torch.uint8)
    frames = [(t, zeros, ones) for t in (9, 0)]
    gif, strip = pictures.reverse_process(frames, nrow=3, samples=2)
    assert len(gif) == 2 and gif[0].mode == "RGB" and strip.size == (48 + 2 * (2 * 6 + 2), 2 * (4 * 6 + 2) + 14)


def test_progress_chart_plots_the_last_loss_of_each_step_and_the_fid_on_its_own_scale(tmp_path):
    lines = [f"step {s} loss {1 / s:.5f} lr 1e-4 grad_norm 1.0 img/s 10.0" for s in range(10, 1001, 10)]
    lines += ["step 500 fid 80.0 n 9 x", "step 1000 fid 40.0 n 9 x", "step 20 loss 7.0 lr 1 grad_norm 1 img/s 1"]
    (tmp_path / "log.txt").write_text("\n".join(lines) + "\n")  # step 20 again: a resumed run's line counts
    fig = pictures.progress_chart(str(tmp_path / "log.txt"))
    loss_ax, fid_ax = fig.axes
    steps, values = loss_ax.lines[0].get_data()
    assert list(steps) == list(range(10, 1001, 10)) and values[1] == 7.0 and values[2] == 0.03333
    assert loss_ax.get_yscale() == "log" and list(fid_ax.lines[0].get_xdata()) == [500, 1000]
    image = pixels(fig)
    orange = (255, 165, 0)
    assert colour_near(fig, image, fid_ax, 500, 80.0, orange, tolerance=0)   # dots drawn where the axes put them
    assert colour_near(fig, image, fid_ax, 1000, 40.0, orange, tolerance=0)
    (x5, y5), (x10, y10) = fid_ax.transData.transform([(500, 80.0), (1000, 40.0)])
    assert x5 < x10 and y5 > y10                                              # FID 80 higher and further left
    assert colour_near(fig, image, loss_ax, 500, loss_ax.lines[1].get_ydata()[49], (0, 0, 0), tolerance=60)


def test_schedule_chart_draws_both_scales_of_both_schedules_with_the_samplers_steps_on_them():
    t = torch.arange(1000, dtype=torch.float64)
    abar = {"linear": torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0),
            "cosine": torch.cos((t + 1) / 1000 * torch.pi / 2) ** 2}
    steps = {"linear": [0, 100, 400, 999], "cosine": [0, 300, 600, 999]}
    fig = pictures.schedule_chart(abar, steps, "4 steps", [0, 500, 999], "3 uniform steps")
    ax = fig.axes[0]
    image = pixels(fig)
    colours = {"linear": ((0, 0, 0), (31, 119, 180)), "cosine": ((255, 165, 0), (214, 39, 40))}  # black, tab:blue ...
    for name, (signal, noise) in colours.items():
        for tt in (300, 700):  # the curves: sqrt(ᾱ_t) and sqrt(1 − ᾱ_t) (Eq. 4's scales)
            assert colour_near(fig, image, ax, tt, abar[name][tt].sqrt(), signal), (name, tt)
            assert colour_near(fig, image, ax, tt, (1 - abar[name][tt]).sqrt(), noise), (name, tt)
        for tt in steps[name][1:-1]:  # a dot at the sampler's t, wider than the line: 3 px off it, still drawn (not
            # at t = 0 or T − 1, where the other schedule's dots lie on top)
            x, y = ax.transData.transform((tt, abar[name][tt].sqrt()))
            row, col = image.shape[0] - round(y), round(x)
            assert any((np.abs(image[row + dy, col] - signal).max() <= 40) for dy in (-3, 3)), (name, tt)
    grey = [line for line in ax.lines if line.get_label() == "3 uniform steps"][0]
    assert list(grey.get_xdata()) == [0, 500, 999] and set(grey.get_ydata()) == {0}


def test_pictures_imports_nothing_of_the_project():
    import ast
    tree = ast.parse(open(pictures.__file__).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names <= {"re", "torch", "matplotlib", "PIL", "torchvision"}, names
