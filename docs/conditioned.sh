#!/usr/bin/env bash
# The table of "Conditioned on an image" (docs/measurements.md): SR3's ×2 (16 → 32 px) and ×4 (8 → 32 px) and
# Palette's colourisation, each a `--preset small` model trained on the CIFAR-10 training folder for STEPS steps, then
# run on 1,000 random test images of their own size (degraded as in training, so the truth is known): the PSNR the
# command prints, the FID of its results against the training set, and beside them those of bicubic (or of the grey
# images). The commands' own sampler (the preset's: DDIM 25 steps, η 1, guidance 2).
#   bash docs/conditioned.sh OUT CIFAR10_FOLDER INCEPTION.pth CIFAR10_TRAIN_STATS.npz [STEPS [N [JOBS]]]
# JOBS: some of "upscale 2", "upscale 4", "colorize 4" (default all three, one after the other)
set -euo pipefail
out=$1 cifar=$2 inception=$3 stats=$4 steps=${5:-1350} n=${6:-1000} jobs=${7:-"upscale 2,upscale 4,colorize 4"}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
IFS=, read -ra jobs <<< "$jobs"
for job in "${jobs[@]}"; do
    set -- $job
    task=$1 factor=$2
    name=$task$([ "$task" = upscale ] && echo "x$factor" || true)
    run="$out/$name"
    [ -f "$run/ckpt.pt" ] || /usr/bin/time -f "trained in %e s (%U s of CPU time)" python "$here/ddpm.py" train \
        --data "$cifar/train" --preset small --task "$task" --factor "$factor" --steps "$steps" --sample-every 0 \
        --out "$run" 2>&1 | tail -2
    python "$here/ddpm.py" "$task" "$cifar/test" --ckpt "$run/ckpt.pt" --n "$n" --out "$run/results/" 2>&1 | tail -2
    # the baseline on the same n test images (edit_inputs' pick: random_subset(n, seed 0) of the folder's listing)
    PYTHONPATH="$here" python - "$cifar/test" "$n" "$task" "$factor" "$run/baseline" <<'EOF'
import os, sys
import torch
from ddpm_tool.data import degrade, load_images, random_subset, to_uint8
from ddpm_tool.pictures import grid
folder, n, task, factor, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
images = load_images(folder, image_size=32, pick=random_subset(n, 0))[0].float() / 127.5 - 1
os.makedirs(out, exist_ok=True)
for i, x in enumerate(to_uint8(degrade(images, task, factor))):  # grey: R = G = B, as the grey input is shown
    grid(x.expand(3, -1, -1)[None], 1).save(f"{out}/{i:06d}.png")
EOF
    for what in results baseline; do
        echo "$name $what: $(python "$here/ddpm.py" fid --samples "$run/$what" --ref "$stats" --inception "$inception" \
             --json 2> /dev/null)"
    done
done
