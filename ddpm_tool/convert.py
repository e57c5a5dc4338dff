"""
convert.py: ddpm.py's U-Net to and from diffusers' UNet2DModel, exactly or not at all. Ho et al.'s network, as
ddpm.py builds it for new runs, is the function google/ddpm-cifar10-32 computes. load_diffusers reads a folder (a
DDPMPipeline's unet/ and scheduler/, or a bare UNet2DModel) or a hub id through diffusers' own from_pretrained (legacy
key names renamed), never building a class a folder names; save_diffusers writes a DDPMPipeline folder. What ddpm.py
does not compute exactly, and every damaged file, is a ConvertError naming it. The key mapping reads the structure
from ddpm.py's UNet itself; the names on both sides are spelled out here. From the run files it takes the error type,
weights-only loading, the hub-id test and run_config, which completes a config read from diffusers.
"""
import inspect
import json
import os
import sys

import torch

from ddpm import AttnBlock, ResBlock

from .runs import UserError, hw, is_hub_id, load_weights, run_config, unet_from_config

DOWN = "DownBlock2D"
ATTN_DOWN = "AttnDownBlock2D"
UP = "UpBlock2D"
ATTN_UP = "AttnUpBlock2D"
# UNet2DModel's settings that ddpm.py's U-Net computes only as these: written on export, required on import
FIXED = dict(freq_shift=1, resnet_time_scale_shift="default", time_embedding_type="positional", class_embed_type=None,
             act_fn="silu")


class ConvertError(UserError):
    """A model that cannot be converted exactly, or a damaged one: the message names the file and the setting."""


def read_json(path):
    """The JSON object in the file `path`, or ConvertError naming the file and what is wrong with it."""
    try:
        with open(path) as f:
            value = json.load(f)
    except ValueError as e:
        raise ConvertError(f"{path}: not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConvertError(f"{path}: a JSON {type(value).__name__}, not the object of a config")
    return value


def unet_plan(cfg):
    """ddpm.py's U-Net for cfg, read from the network itself (built on the meta device: layers, no weights), module by
    module → ([(our prefix, diffusers prefix, how)], the set of its GroupNorms' group counts). how: None (the same
    tensors), "1x1" (a 1×1 convolution diffusers holds as a linear layer) or "qkv" (our fused q, k, v convolution; the
    diffusers prefix is then the list of to_q, to_k, to_v)."""
    with torch.device("meta"):
        net = unet_from_config(cfg, None)
    pairs = [("time_mlp.0", "time_embedding.linear_1", None), ("time_mlp.2", "time_embedding.linear_2", None),
             ("conv_in", "conv_in", None), ("out.0", "conv_norm_out", None), ("out.2", "conv_out", None)]
    blocks = [("mid.0", "mid_block", 0, net.mid[0]), ("mid.1", "mid_block", 1, net.mid[1])]  # (ours, theirs, j, block)
    for side, layers in (("down", net.down), ("up", net.up)):  # diffusers' blocks: a level each, from the image
        level = 0
        j = 0
        for i, layer in enumerate(layers):
            if isinstance(layer, ResBlock):
                blocks.append((f"{side}.{i}", f"{side}_blocks.{level}", j, layer))
                j += 1
            else:  # the level's last layer: the stride-2 convolution, or nearest and a convolution
                conv = f"down.{i}" if side == "down" else f"up.{i}.1"
                pairs.append((conv, f"{side}_blocks.{level}.{side}samplers.0.conv", None))
                level += 1
                j = 0
    for ours, theirs, j, block in blocks:
        resnet = f"{theirs}.resnets.{j}"
        for a, b in [("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"), ("norm2", "norm2"),
                     ("conv2", "conv2"), ("skip", "conv_shortcut")]:
            pairs.append((f"{ours}.{a}", f"{resnet}.{b}", None))
        if isinstance(block.attn, AttnBlock):
            at = f"{theirs}.attentions.{j}"
            pairs += [(f"{ours}.attn.norm", f"{at}.group_norm", None), (f"{ours}.attn.proj", f"{at}.to_out.0", "1x1"),
                      (f"{ours}.attn.qkv", [f"{at}.to_q", f"{at}.to_k", f"{at}.to_v"], "qkv")]
    return pairs, {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)}


def to_diffusers_state(ours, cfg, fold_null=True):
    """Our EMA state dict → UNet2DModel's. fold_null: the null label's class-embedding row is added to
    time_embedding.linear_2.bias, giving the unconditional model guidance uses (DDPMPipeline passes no labels)."""
    state = {}
    for mine, theirs, how in unet_plan(cfg)[0]:
        names = theirs if how == "qkv" else [theirs]
        for leaf in ("weight", "bias"):
            value = ours.get(f"{mine}.{leaf}")
            if value is None:
                continue
            if how and leaf == "weight":  # a 1×1 convolution's weight is a linear layer's
                value = value.flatten(1)
            for name, part in zip(names, value.chunk(len(names))):  # qkv: to_q, to_k, to_v
                state[f"{name}.{leaf}"] = part
    if "class_emb.weight" in ours and fold_null:
        bias = state["time_embedding.linear_2.bias"]
        state["time_embedding.linear_2.bias"] = bias + ours["class_emb.weight"][-1].to(bias.dtype)
    elif "class_emb.weight" in ours:
        state["class_embedding.weight"] = ours["class_emb.weight"]
    return state


def from_diffusers_state(theirs, cfg):
    """UNet2DModel's state dict → ours: the inverse of to_diffusers_state without folding."""
    state = {}
    for mine, name, how in unet_plan(cfg)[0]:
        names = name if how == "qkv" else [name]
        for leaf in ("weight", "bias"):
            if f"{names[0]}.{leaf}" not in theirs:
                continue
            value = torch.cat([theirs[f"{n}.{leaf}"] for n in names])
            state[f"{mine}.{leaf}"] = value[:, :, None, None] if how and leaf == "weight" else value
    if "class_embedding.weight" in theirs:
        state["class_emb.weight"] = theirs["class_embedding.weight"]
    return state


def diffusers_config(cfg, num_classes=None, keep_classes=False):
    """Our config → UNet2DModel's, or ConvertError where diffusers cannot express our network exactly."""
    groups = unet_plan(cfg)[1]
    if len(groups) > 1:
        raise ConvertError(f"its GroupNorms have {sorted(groups)} groups (ddpm.py uses gcd(32, "
                           "C/4)); diffusers has one norm_num_groups for the whole network: only networks whose "
                           "channel counts are all multiples of 128 convert exactly")
    size, mult = cfg["image_size"], cfg["ch_mult"]
    attn = [min(hw(size)) // 2 ** level in cfg["attn_res"] for level in range(len(mult))]
    classes = num_classes + 1 if num_classes and keep_classes else None
    return dict(sample_size=size if isinstance(size, int) else list(size), in_channels=cfg["channels"],
                out_channels=cfg["channels"],
                block_out_channels=[cfg["ch"] * m for m in mult], layers_per_block=cfg["num_res_blocks"],
                down_block_types=[ATTN_DOWN if a else DOWN for a in attn],
                up_block_types=[ATTN_UP if a else UP for a in reversed(attn)],
                downsample_padding=0 if cfg["same_padding"] else 1, norm_num_groups=min(groups),
                norm_eps=cfg["norm_eps"], attention_head_dim=None, flip_sin_to_cos=False, **FIXED,
                dropout=cfg["dropout"], num_class_embeds=classes,
                mid_block_scale_factor=1, add_attention=True, center_input_sample=False)


PREDICTION_TYPES = dict(eps="epsilon", v="v_prediction", x0="sample")  # ddpm.py's → diffusers' names


def diffusers_scheduler(cfg):
    """Our schedule and variance → DDPMScheduler's config (Ho et al.'s ancestral sampler, x̂_0 clipped)."""
    T = cfg["timesteps"]
    variance = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small"}[cfg["variance"]]
    schedule = dict(beta_schedule="squaredcos_cap_v2")
    if cfg["schedule"] == "linear":  # ddpm.py's linear schedule: 1e-4 → 0.02, scaled by 1000/T
        schedule = dict(beta_schedule="linear", beta_start=1000 / T * 1e-4, beta_end=1000 / T * 0.02)
    return dict(num_train_timesteps=T, variance_type=variance, clip_sample=True, clip_sample_range=1.0,
                prediction_type=PREDICTION_TYPES[cfg["prediction"]], **schedule)


def save_diffusers(ckpt, out, keep_classes=False):
    """A ddpm.py checkpoint's EMA model → a DDPMPipeline folder `out`. A class-conditional model becomes the
    unconditional one guidance uses, unless keep_classes: num_class_embeds = classes + 1 (the last: the null label)."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    cfg = ckpt["config"]
    num_classes = None if cfg["unconditional"] else len(ckpt["classes"])
    unet = UNet2DModel(**diffusers_config(cfg, num_classes, keep_classes))
    ema = {k: v.float() for k, v in ckpt["ema"]["model"].items()}
    unet.load_state_dict(to_diffusers_state(ema, cfg, fold_null=not keep_classes))
    pipeline = DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(**diffusers_scheduler(cfg)))
    pipeline.save_pretrained(out)
    extra = dict(_ddpm_eta=cfg["eta"])  # how ddpm.py samples it, in keys diffusers skips (its private ones: "_…")
    if keep_classes and num_classes:
        extra["_ddpm_classes"] = list(ckpt["classes"])
    path = os.path.join(out, "unet", "config.json")
    config = dict(read_json(path), **extra)
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    mode = os.stat(os.path.join(out, "model_index.json")).st_mode  # safetensors writes its weights 0600
    for folder, _, names in os.walk(out):
        for name in names:
            os.chmod(os.path.join(folder, name), mode)


def refuse_pickles(folder):
    """Every .bin in folder loaded with weights_only=True first: a pickled object is refused before diffusers runs."""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".bin"):
            load_weights(os.path.join(folder, name), unreadable="refused, it holds no readable weights")


def locate(path):
    """A folder or a hub id → (the UNet2DModel's folder, the scheduler's config file or None)."""
    if not os.path.isdir(path):
        if not is_hub_id(path):
            raise ConvertError(f"{path}: no such file or folder, nor a hub id owner/name")
        from huggingface_hub import snapshot_download
        try:
            path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin"])
        except Exception as e:
            raise ConvertError(f"{path}: could not fetch it from the Hugging Face hub ({type(e).__name__}); "
                               "offline, download it elsewhere and pass its folder") from None
    if os.path.isfile(os.path.join(path, "unet", "config.json")):  # a DDPMPipeline's folder
        return os.path.join(path, "unet"), os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(os.path.join(path, "config.json")):  # a bare UNet2DModel's
        return path, os.path.join(path, "scheduler_config.json")
    raise ConvertError(f"{path}: neither a checkpoint file nor a diffusers folder (no config.json, unet/config.json)")


def our_schedule(scheduler_file):
    """The scheduler's config → (T, schedule, variance, prediction) of ddpm.py, or ConvertError; none: Ho et al.'s,
    with a note."""
    if not os.path.isfile(scheduler_file):
        return 1000, "linear", "fixedlarge", "eps"
    s = read_json(scheduler_file)
    T = s.get("num_train_timesteps", 1000)
    for key in [k for k in ("num_train_timesteps", "beta_start", "beta_end", "clip_sample_range") if k in s]:
        if type(s[key]) not in (int, float):  # bool too
            raise ConvertError(f"{scheduler_file}: {key} is {s[key]!r}, not a number")
    names = {name: key for key, name in PREDICTION_TYPES.items()}
    prediction = names.get(s.get("prediction_type", "epsilon"))
    refuse = [(prediction is None, f"prediction_type {s.get('prediction_type')}"),
              (s.get("trained_betas") is not None, "trained_betas"),
              (str(s.get("variance_type")).startswith("learned"), f"variance_type {s.get('variance_type')} (learned)"),
              (not s.get("clip_sample", True), "clip_sample false (ddpm.py's samplers clip x̂_0 to [-1, 1])"),
              (s.get("clip_sample_range", 1.0) != 1.0, f"clip_sample_range {s.get('clip_sample_range')}"),
              (s.get("thresholding", False), "thresholding")]
    schedule = {"linear": "linear", "squaredcos_cap_v2": "cosine"}.get(s.get("beta_schedule", "linear"))
    refuse.append((schedule is None, f"beta_schedule {s.get('beta_schedule')} (ddpm.py: linear or squaredcos_cap_v2)"))
    if schedule == "linear":
        start, end = s.get("beta_start", 1e-4), s.get("beta_end", 0.02)
        ours = (1000 / T * 1e-4, 1000 / T * 0.02)
        off = abs(start - ours[0]) > 1e-12 or abs(end - ours[1]) > 1e-12
        refuse.append((off, f"linear betas {start} → {end} (ddpm.py's for T = {T}: {ours[0]:g} → {ours[1]:g})"))
    for bad, what in refuse:
        if bad:
            raise ConvertError(f"{scheduler_file}: {what}: ddpm.py cannot compute it exactly")
    variance = "fixedsmall" if str(s.get("variance_type")).startswith("fixed_small") else "fixedlarge"
    return T, schedule, variance, prediction


def our_config(c, where):
    """UNet2DModel's (complete) config → ddpm.py's network keys, or ConvertError naming what differs."""
    kinds = dict(sample_size=(int, list), block_out_channels=(list,), norm_eps=(int, float), **{k: (int,) for k in (
        "in_channels", "out_channels", "layers_per_block", "norm_num_groups", "downsample_padding")})
    for key, kind in kinds.items():  # a list: of whole numbers > 0
        value = c.get(key)
        positive = type(value) is list and value and all(type(v) is int and v > 0 for v in value)
        if type(value) not in kind or type(value) is list and not positive:
            raise ConvertError(f"{where}: {key} is {value!r}: missing, or not what a UNet2DModel's config holds")
    bc = list(c["block_out_channels"])
    ch = bc[0]
    sides = [c["sample_size"]] * 2 if isinstance(c["sample_size"], int) else c["sample_size"]
    if len(sides) != 2:
        raise ConvertError(f"{where}: sample_size {sides}: one side, or height and width")
    size = sides[0] if sides[0] == sides[1] else tuple(sides)
    S = min(hw(size))
    attn = [t == ATTN_DOWN for t in c["down_block_types"]]
    cfg = dict(channels=c["in_channels"], ch=ch, ch_mult=tuple(b // ch for b in bc), image_size=size,
               num_res_blocks=c["layers_per_block"], attn_res=tuple(S // 2 ** i for i, a in enumerate(attn) if a),
               dropout=c.get("dropout", 0.0), same_padding=c["downsample_padding"] == 0, norm_eps=c["norm_eps"],
               unconditional=c.get("num_class_embeds") is None, task="generate")  # DDPMPipeline's: no image c
    heads = [b // (c["attention_head_dim"] or b) for b in bc]
    try:
        groups = unet_plan(cfg)[1]
    except ValueError as e:  # a size the U-Net cannot halve enough
        raise ConvertError(f"{where}: {e}") from None
    refuse = [
        (any(b % ch for b in bc), f"block_out_channels {bc} (each a multiple of the first)"),
        (set(c["down_block_types"]) - {DOWN, ATTN_DOWN}, f"down_block_types {c['down_block_types']}"),
        (list(c["up_block_types"]) != [ATTN_UP if a else UP for a in reversed(attn)],
         f"up_block_types {c['up_block_types']} (the mirror of the down blocks)"),
        (c["out_channels"] != c["in_channels"], "out_channels ≠ in_channels"),
        (any(h != 1 for h in heads), f"attention_head_dim {c['attention_head_dim']}: more than one attention head"),
        (c["flip_sin_to_cos"], "flip_sin_to_cos true"),
        *[(c.get(key) != value, f"{key} {c.get(key)}") for key, value in FIXED.items()],
        (c["center_input_sample"], "center_input_sample"),
        (c["mid_block_scale_factor"] != 1, f"mid_block_scale_factor {c['mid_block_scale_factor']}"),
        (not c.get("add_attention", True), "add_attention false"),
        (c.get("attn_norm_num_groups") not in (None, c["norm_num_groups"]), "attn_norm_num_groups"),
        (c["downsample_padding"] not in (0, 1), f"downsample_padding {c['downsample_padding']}"),
        (c.get("downsample_type", "conv") != "conv" or c.get("upsample_type", "conv") != "conv", "resnet resampling"),
        (groups != {c["norm_num_groups"]},
         f"norm_num_groups {c['norm_num_groups']}: ddpm.py's U-Net builds {sorted(groups)} groups"),
    ]
    for bad, what in refuse:
        if bad:
            raise ConvertError(f"{where}: {what}: ddpm.py cannot compute it exactly")
    return cfg


def load_diffusers(path):
    """A diffusers UNet2DModel (a DDPMPipeline's folder, a bare UNet2DModel's, or a hub id owner/name) → a ddpm.py
    checkpoint. Classes: ddpm.py's names if it exported them, else "0" … for num_class_embeds − 1 (the last: null)."""
    from diffusers import UNet2DModel
    from diffusers.utils import logging
    if "DIFFUSERS_VERBOSITY" not in os.environ:  # unless asked for, its notes and errors would break our one line
        logging.set_verbosity(logging.CRITICAL)
    folder, scheduler_file = locate(path)
    config_file = os.path.join(folder, "config.json")
    config = read_json(config_file)
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ConvertError(f"{folder}: a {name}; ddpm.py reads UNet2DModel only")
    T, schedule, variance, prediction = our_schedule(scheduler_file)
    given = UNet2DModel.extract_init_dict(UNet2DModel.load_config(folder))[0]  # legacy keys renamed
    signature = inspect.signature(UNet2DModel.__init__).parameters.values()
    defaults = {p.name: p.default for p in signature if p.default is not inspect.Parameter.empty}
    cfg = our_config({**defaults, **given}, config_file)  # refused before any weights are read
    refuse_pickles(folder)
    weights = [n for n in sorted(os.listdir(folder)) if n.startswith("diffusion_pytorch_model.")]
    if not weights:
        raise ConvertError(f"{folder}: no weights file (diffusion_pytorch_model.safetensors or .bin)")
    try:
        unet = UNet2DModel.from_pretrained(folder, low_cpu_mem_usage=False)
    except Exception as e:  # truncated, or of another shape than the config's
        what = " ".join(str(e).split())[:200]
        raise ConvertError(f"{folder}/{weights[0]}: truncated, or weights of another shape than config.json's "
                           f"({type(e).__name__}: {what})") from None
    if our_config(dict(unet.config), config_file) != cfg:
        raise ConvertError(f"{folder}: its config reads differently once loaded")
    eta = config.get("_ddpm_eta", 0.0)  # ddpm.py's export: the model's η
    if type(eta) not in (int, float) or not 0 <= eta <= 1:
        raise ConvertError(f"{config_file}: _ddpm_eta is {eta!r}, not a number in [0, 1]")
    # data=None: the data it learnt is unknown
    cfg.update(timesteps=T, schedule=schedule, variance=variance, prediction=prediction, eta=eta, data=None)
    classes = [] if cfg["unconditional"] else [str(k) for k in range(unet.config["num_class_embeds"] - 1)]
    if not os.path.isfile(scheduler_file):  # said once the model has loaded
        print(f"note: no {scheduler_file}: Ho et al.'s schedule assumed (linear β 1e-4 → 0.02, T = 1000, σ²_t = β_t)",
              file=sys.stderr)
    names = config.get("_ddpm_classes")  # ddpm.py's export --keep-classes: the class names
    if isinstance(names, list) and len(names) == len(classes) and all(isinstance(n, str) for n in names):
        classes = names
    state = from_diffusers_state(unet.state_dict(), cfg)
    return dict(config=run_config(cfg), classes=classes, ema=dict(model=state), step=0, source=path)
