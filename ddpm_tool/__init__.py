"""
ddpm_tool: the tool that runs ddpm.py's method: `python ddpm.py --help` lists its commands.

Its modules are layered: each imports only those above it in this list (and ddpm, the method), the command line
imports them all.

    runs       run files: the one error type, atomic saves, the lock, a run's config, checkpoints
    pictures   grids, GIFs, strips and charts (matplotlib for the charts only)
    trackers   TensorBoard and W&B, each imported only when asked for
    nll        the variational bound in bits/dim, over T terms or estimated from K
    fid        FID with TensorFlow's Inception, as torch-fidelity ports it
    convert    to and from diffusers' UNet2DModel
    data       images decoded once into memory, from folders or torchvision's data sets
    devices    devices, precision and processes (DDP under torchrun)
    sampling   sampling from a checkpoint: the loader, the sampler's options, one batched loop, editing inputs
    restore    upscale and colorize: a conditioned model's inputs, rows and measures
    trainer    the Trainer: batches, DDP and the bookkeeping around ddpm.train_step
    flags      the flags' types, the rows several commands share and train's, the check of a saved config
    cli        each command's flags beside its handler, and main
"""
