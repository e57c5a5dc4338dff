"""
fid.py: the Fréchet Inception Distance (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) of uint8 images, as
the papers measure it: TensorFlow's Inception of 2015-12-05 (pool3, 2048 features) as torch-fidelity ports it, with
TF1's bilinear resize to 299 px inside. torchvision's ImageNet Inception gives other, incomparable numbers. It
imports nothing from ddpm.py or the rest of the tool: copy it to score your own samples.

    net = load_inception("weights.pth")           # a local copy of the weights; None: torch-fidelity downloads them
    mu, sigma, n = inception_stats(net, batches)   # batches: uint8 (B, C, H, W), C = 3 or 1 (grey)
    mu_ref, sigma_ref, _ = load_stats("ref.npz")   # pytorch-fid's and EDM's format: arrays mu, sigma (and n)
    print(frechet_distance(mu, sigma, mu_ref, sigma_ref))

FID is biased upwards at small n: compare figures of equal n only (the papers: 50,000 samples against the 50,000
training images). Quantise samples to uint8 as their PNGs would store them before scoring.
"""
import hashlib
import os
import sys

import numpy as np
import torch

DIMS = 2048  # Inception's pool3 features, on which FID is defined


class FIDError(ValueError):
    """A problem with FID's inputs that the caller can fix (a file, too few images); the message is one line."""


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½), in float64, never below 0.
    Tr((Σ₁ Σ₂)^½) = Σᵢ sqrt(λᵢ), λ the eigenvalues of sqrt(Σ₁) Σ₂ sqrt(Σ₁): symmetric PSD,
    so eigvalsh is stable, also for a rank-deficient Σ (fewer samples than features)."""
    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(v, dtype=torch.float64) for v in (mu1, sigma1, mu2, sigma2))
    w, v = torch.linalg.eigh(sigma1)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T                                                          # sqrt(Σ₁)
    m = root1 @ sigma2 @ root1
    lam = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0)  # rounding makes tiny negative eigenvalues: clip them
    fid = float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * lam.sqrt().sum())
    return max(fid, 0.0)  # a set against itself is 0 but for rounding, which would print as -0.000


def load_inception(path=None, device="cpu"):
    """The network, in eval mode, channels_last: uint8 RGB (B, 3, H, W) in → a tuple holding the (B, 2048) features.
    path: a local copy of its weights (offline), read with weights_only=True first, since torch-fidelity itself
    would unpickle anything; None: torch-fidelity downloads them once. Needs PyPI torch-fidelity (ImportError)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    if path is not None and not os.path.isfile(path):
        raise FIDError(f"Inception weights {path}: no such file")
    try:
        if path is not None:
            torch.load(path, map_location="cpu", weights_only=True)
        with torch.random.fork_rng(devices=[]):  # building its layers draws initial weights: not from the caller's RNG
            net = FeatureExtractorInceptionV3("inception-v3-compat", [str(DIMS)], feature_extractor_weights_path=path)
    except Exception as e:
        raise FIDError(f"Inception weights {path or '(download)'}: cannot load them ({type(e).__name__})") from None
    return net.to(device, memory_format=torch.channels_last)


def rebatch(batches, size):
    """Tensors (B, …) of any B → tensors of `size` rows (the last one fewer), in the same order."""
    held = None
    for x in batches:
        held = x if held is None else torch.cat([held, x])
        while len(held) >= size:
            yield held[:size]
            held = held[size:]
    if held is not None and len(held):
        yield held


@torch.inference_mode()
def inception_stats(net, batches, batch_size=50):
    """μ, Σ (float64) and n of the Inception features of uint8 image batches (B, C, H, W); grey images (C = 1) enter
    as R = G = B, as PIL's convert("RGB") makes them. Σ is the unbiased covariance, from sums: no (n, 2048) array.
    Inception sees batch_size images at a time however they come, so the same images give the same bits."""
    device = next(net.parameters()).device
    n = 0
    total = 0
    outer = 0
    for x in rebatch(batches, batch_size):
        with torch.autocast(device.type, enabled=False):  # fp32 even inside a sampler's bf16 autocast
            f = net(x.expand(-1, 3, -1, -1).to(device))[0].double().cpu()
        n += len(f)
        total = total + f.sum(0)
        outer = outer + f.T @ f
    if n < 2:
        raise FIDError(f"FID needs a covariance, so at least 2 images; got {n}")
    mu = total / n
    return mu, (outer - n * torch.outer(mu, mu)) / (n - 1), n


def load_stats(path):
    """(μ, Σ, n) from an .npz holding mu (2048,) and sigma (2048, 2048), the format pytorch-fid and EDM write; n is
    None if the file has none."""
    try:
        with np.load(path) as f:
            mu, sigma = torch.from_numpy(f["mu"]), torch.from_numpy(f["sigma"])
            n = int(f["n"]) if "n" in f else None
    except Exception as e:  # not a file, not an .npz, no mu or sigma
        raise FIDError(f"{path}: not an .npz with arrays mu and sigma ({type(e).__name__}: {e})") from None
    if mu.shape != (DIMS,) or sigma.shape != (DIMS, DIMS):  # pytorch-fid --dims 64, 192, 768 write others
        raise FIDError(f"{path} holds statistics of {'x'.join(map(str, mu.shape))}-dimensional features (mu "
                       f"{tuple(mu.shape)}, sigma {tuple(sigma.shape)}); FID here needs Inception's {DIMS:,} pool3 "
                       "features (pytorch-fid's default, --dims 2048)")
    return mu, sigma, n


def save_stats(path, mu, sigma, n, **extra):
    """Write μ, Σ and n as load_stats reads them, through a temporary file: whole or not at all."""
    tmp = f"{path}.tmp{os.getpid()}.npz"
    try:
        np.savez(tmp, mu=np.asarray(mu), sigma=np.asarray(sigma), n=n, **extra)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def reference_stats(net, ref, decode, cache_dir, channels=None):
    """(μ, Σ, n) of a reference: an .npz (load_stats), or else the uint8 images decode(ref) gives (cached_stats in
    cache_dir), refused unless they have `channels` (if given): grey images against RGB ones would score the colour."""
    if ref.endswith(".npz"):
        return load_stats(ref)
    images = decode(ref)
    if channels is not None and images.shape[1] != channels:
        kind = {1: "grey", 3: "RGB"}
        raise FIDError(f"{ref} is {kind[images.shape[1]]}, the samples are {kind[channels]}: FID would score the "
                       "colour (grey enters Inception as R = G = B); compare grey with grey")
    return cached_stats(net, images, cache_dir)


def cached_stats(net, images, cache_dir, batch_size=50):
    """inception_stats of uint8 images (N, C, H, W), kept in cache_dir/inception-<hash>.npz. The hash covers what
    produced them: the pixels themselves, the network's weights and the torch-fidelity version, so a changed data set
    or network is computed anew, and two sets never share a file (the key stored inside is checked on loading). A
    cache file that cannot be read is computed anew, one that cannot be written is skipped with a note."""
    from tqdm import tqdm
    version = getattr(sys.modules.get("torch_fidelity"), "__version__", None)
    key = hashlib.sha256(f"{tuple(images.shape)} {version}".encode())
    for value in [*net.state_dict().values(), images]:
        key.update(value.cpu().contiguous().numpy().tobytes())
    key, path = key.hexdigest(), os.path.join(cache_dir, f"inception-{key.hexdigest()[:20]}.npz")
    try:
        with np.load(path) as f:
            if str(f["key"]) == key:
                return torch.from_numpy(f["mu"]), torch.from_numpy(f["sigma"]), int(f["n"])
    except Exception:  # none yet, or truncated or corrupt: it is only a cache, computed anew
        pass
    mu, sigma, n = inception_stats(net, tqdm(images.split(batch_size), "reference", leave=False, disable=None))
    try:
        os.makedirs(cache_dir, exist_ok=True)
        save_stats(path, mu.numpy(), sigma.numpy(), n, key=key)
    except Exception as e:  # a full disk, a read-only folder: the statistics are still good, only not kept
        print(f"note: FID statistics not cached in {cache_dir} ({getattr(e, 'strerror', None) or e}); they will be "
              "computed anew next time", file=sys.stderr)
    return mu, sigma, n
