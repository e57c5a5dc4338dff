"""
pictures.py: pictures of a diffusion model and its training. Labelled grids, the reverse process as a GIF and a
strip, the forward process as a strip, and two charts drawn with matplotlib's object API on the Agg canvas (no pyplot
state, no display: safe inside a training loop and under tests): the progress of a training log and a noise
schedule. Images come in as uint8 tensors (C, H, W), C = 1 (grey) or 3; pictures go out as PIL images or matplotlib
Figures (fig.savefig(file, format="png")). It imports nothing from ddpm.py or the tool, so it copies alone into
another project; matplotlib and torchvision only where a chart or a grid is drawn.
"""
import re

import torch
from PIL import Image, ImageDraw, ImageOps


def tiles(images, nrow, padding=1):
    """uint8 images (B, C, H, W) → one uint8 image (C, H', W') of them in rows of nrow; grey stays one channel."""
    from torchvision.utils import make_grid  # here, not above: importing torchvision takes 2 s, most commands need none
    return make_grid(images, nrow=nrow, padding=padding)[:images.shape[1]]  # make_grid makes grey RGB


def grid(images, nrow, padding=1):
    """uint8 images (B, C, H, W) → one PIL image of them in rows of nrow, grey ("L") for one channel."""
    return Image.fromarray(tiles(images, nrow, padding).permute(1, 2, 0).squeeze(2).numpy())


def labelled_grid(rows, col_labels=(), row_labels=(), scale=2):
    """Rows of equal-sized uint8 images (C, H, W) → one PIL image `scale` times as large, white text on black under
    each column and left of each row."""
    picture = grid(torch.stack([x for row in rows for x in row]), len(rows[0]), padding=2)
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    left = 48 * bool(row_labels)
    canvas = ImageOps.expand(picture, (left, 0, 0, 14 * bool(col_labels)))  # black margins for the labels
    draw, (h, w) = ImageDraw.Draw(canvas), [(size + 2) * scale for size in rows[0][0].shape[-2:]]  # tile + gap
    for j, text in enumerate(col_labels):
        draw.text((left + j * w + 2 * scale, picture.height), text, fill="white")
    for i, text in enumerate(row_labels):
        draw.text((2, i * h + h // 2 - 5), text, fill="white")
    return canvas


def forward_strip(rows, ts, schedules=("linear", "cosine")):
    """The forward process q(x_t | x_0): row i holds an image's x_t at the steps ts, for schedules[i % len] in turn."""
    return labelled_grid(rows, [f"t={t}" for t in ts], list(schedules) * (len(rows) // len(schedules)))


def reverse_process(frames, nrow, samples=8):
    """frames [(t, x_t, x̂_0)] of uint8 batches (B, C, H, W), in the order a sampler visits them → (the frames of a
    GIF: the batch's x_t beside its x̂_0 at each t; a strip: those t left to right, two rows for each of the first
    `samples` images, x_t above x̂_0)."""
    gif = [labelled_grid([[tiles(x_t, nrow), tiles(x0, nrow)]], [f"x_t, t = {t}", "x_0 predicted from it"])
           for t, x_t, x0 in frames]
    n = min(len(frames[0][1]), samples)
    rows = [[frame[k][i] for frame in frames] for i in range(n) for k in (1, 2)]
    return gif, labelled_grid(rows, [f"t={t}" for t, _, _ in frames], ["x_t", "x_0 pred"] * n)


def save_gif(frames, file, ms=400, hold=3000):
    """PIL images → an animated GIF in `file` (a path or a binary file), looping, the last frame held `hold` ms."""
    frames[0].save(file, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=[ms] * (len(frames) - 1) + [hold])


def figure(size=(640, 320)):
    """A matplotlib Figure of `size` pixels on its own Agg canvas: no pyplot, no global state, no display."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(size[0] / 100, size[1] / 100), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def read_log(path, key):
    """[(step, value)] of a log's lines "step N <key> V ...", by step, the last value of each step (a resumed run
    logs the steps after its checkpoint again)."""
    with open(path) as f:
        text = f.read()
    return sorted({int(s): float(v) for s, v in re.findall(rf"^step (\d+) {key} (\S+)", text, re.M)}.items())


def progress_chart(log_path, size=(640, 320)):
    """A Figure of a training log: the loss against the step on a log scale (grey: each line; black: smoothed) and
    the FID where measured (orange dots, its own scale on the right)."""
    from matplotlib.ticker import LogFormatter, NullLocator
    loss, fid = [(s, v) for s, v in read_log(log_path, "loss") if v > 0], read_log(log_path, "fid")
    smooth = [v for _, v in loss[:1]]
    for _, v in loss[1:]:
        smooth.append(smooth[-1] ** 0.9 * v ** 0.1)  # an exponential moving average over log lines, in log space
    fig = figure(size)
    fig.subplots_adjust(left=0.12, right=0.88, bottom=0.15, top=0.95)  # fixed margins, plain labels and no minor
    # ticks: drawn at every log line, so a cheap chart (0.1 s, not 0.25 s)
    ax = fig.add_subplot()
    ax.plot([s for s, _ in loss], [v for _, v in loss], color="0.6", lw=1, label="loss")
    ax.plot([s for s, _ in loss], smooth, color="black", lw=2, label="smoothed")
    ax.set(xlabel="training step", ylabel="loss", yscale="log")
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.yaxis.set_minor_locator(NullLocator())
    ax.legend(loc="upper left", fontsize=8)
    if fid:
        right = ax.twinx()
        right.plot(*zip(*fid), "o-", color="orange", lw=2, ms=6)
        right.set_ylim(0, 1.1 * max(v for _, v in fid))
        right.set_ylabel("FID", color="orange")
    return fig


def schedule_chart(alphas_cumprod, steps, label, grey=(), grey_label="", size=(640, 320)):
    """The scales in x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε against t: the signal's sqrt(ᾱ_t) and the noise's
    sqrt(1 − ᾱ_t), for each schedule of alphas_cumprod {name: ᾱ (T,)}; dots where a sampler evaluates the network
    (steps {name: [t]}, named by label), grey dots on the t axis at `grey` (another sampler's t) → a Figure."""
    fig = figure(size)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.9)
    ax = fig.add_subplot()
    colours = [("black", "tab:blue"), ("orange", "tab:red"), ("tab:green", "tab:purple")]
    for (name, abar), pair in zip(alphas_cumprod.items(), colours):
        abar = torch.as_tensor(abar, dtype=torch.float64)
        for scale, colour, what in zip((abar.sqrt(), (1 - abar).sqrt()), pair, ("signal sqrt(ᾱ)", "noise sqrt(1 − ᾱ)")):
            ax.plot(scale, color=colour, lw=1.5, label=f"{name}: {what}")
            ax.plot(steps[name], scale[steps[name]], "o", color=colour, ms=5)
    if len(grey):
        ax.plot(grey, [0 for _ in grey], "o", color="0.6", ms=4, clip_on=False, label=grey_label)
    ax.set(xlabel="t", ylim=(0, 1.02), title=f"dots: the t of {label}")
    ax.legend(fontsize=7, loc="center right")
    return fig


def editing_strip(rows, col_labels, row_labels=()):
    """What `sample --inpaint`, `--interpolate` and `--from` show: rows of uint8 images (C, H, W), labelled; a grey
    tile (a mask) beside colour ones is repeated into R, G and B."""
    channels = max(x.shape[0] for row in rows for x in row)
    rows = [[x.expand(channels, -1, -1) for x in row] for row in rows]
    return labelled_grid(rows, col_labels, row_labels)
