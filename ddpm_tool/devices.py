"""
devices.py: where and how the network runs. The device (the best found, or the one named), the precision (`auto`:
bf16 where the hardware computes it natively, else fp32) as an autocast context, and the processes of a torchrun
launch (DDP, one GPU each).
"""
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist

from .runs import UserError


def get_device(name=None):
    """The named device, else the best one found: cuda, then mps, then cpu."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if name is None:
        name = next(kind for kind, here in available.items() if here)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (cpu, cuda, cuda:1, mps)") from None
    if not available.get(device.type, True):
        raise UserError(f"--device {name}: not available on this machine")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: let cuDNN time its algorithms once
    return device


def resolve_precision(precision, device, task, cpu=None):
    """--precision for `task` ("train", "sample", "nll") → "bf16" or "fp32": auto is bf16 on CUDA (fp16's speed, not its
    NaNs), and on a CPU to sample where ATen computes bf16 natively (AVX-512 with amx_bf16 or avx512_bf16: 2.0× as
    fast; training 1.1×; emulated: 7× slower). cpu: (capability, {flag: on})."""
    if precision != "auto":
        return precision
    if task == "nll":  # L_0 turns on ε̂ to within a bin of 2/255, finer than bf16's 8-bit mantissa resolves
        return "fp32"
    if device.type != "cpu":
        return "bf16" if device.type == "cuda" else "fp32"
    if cpu is None:
        flags = {"amx_bf16": torch.cpu._is_amx_tile_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported()}
        cpu = (torch.backends.cpu.get_cpu_capability(), flags)
    capability, flags = cpu
    native = capability.startswith("AVX512") and any(flags.get(f) for f in ("amx_bf16", "avx512_bf16"))
    return "bf16" if task == "sample" and native else "fp32"


def autocast(device, precision):
    """bf16 autocast for "bf16": the network's matrix work; schedule, loss, GroupNorm, x̂_0 and steps stay fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def init_processes(batch_size, device_name=None, micro_batch=None):
    """Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set): one of `world` DDP processes, one GPU each; rank 0 writes.
    → (device, rank, world, ctrl): ctrl, a gloo group for the stop flag (no GPU sync a step), None without torchrun."""
    ddp = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if batch_size % world or micro_batch and batch_size // world % micro_batch:
        parts = f" in micro-batches of {micro_batch}" if micro_batch else ""
        raise UserError(f"--batch-size {batch_size} (the global batch) does not split over {world} processes{parts}")
    device = get_device(device_name)
    if not ddp:
        return device, rank, world, None
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world, dist.new_group(backend="gloo")

