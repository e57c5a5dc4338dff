#!/usr/bin/env bash
# Remakes every picture in samples/ with the command the README prints beside it, into a temporary folder, and
# compares each with the committed file byte for byte. Most were made in fp32 on 2 AVX2 cores: on an AVX-512 CPU
# they are remade with --precision fp32 and PyTorch's and oneDNN's AVX2 kernels (the env of `avx2` below; the
# AVX-512 ones round some sums differently). The editing pictures were made with `auto` on a CPU with avx512_bf16,
# which is bf16 there: remade as they are (needs such a CPU).
#   bash docs/remake_samples.sh /tmp/cifar10 /tmp/mnist      # CIFAR-10 JPEG folder and MNIST root (shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
cifar=${1:-/tmp/cifar10}
mnist=${2:-/tmp/mnist}
out=$(mktemp -d)
m=samples/cifar10_small.pt
run() { echo "+ $*" >&2; /usr/bin/time -f "  %e s" python ddpm.py "$@" 2>&1 | grep -v "^\s*$" | tail -2 >&2; }
avx2() { ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 run "$@"; }
avx2 sample --ckpt $m --n 40 --process --out $out/cifar10_process.png --precision fp32
avx2 sample --ckpt $m --n 100 --out $out/cifar10_small_classes.png --precision fp32
avx2 sample --ckpt $m --class ship --out $out/ship.png --precision fp32
for g in 1 2 4; do avx2 sample --ckpt $m --class horse --n 16 --guidance $g --out $out/horse_guidance$g.png --precision fp32; done
avx2 sample --ckpt $m --n 10 --steps 100 --out $out/ddim100.png --precision fp32
avx2 sample --ckpt $m --n 10 --steps all --out $out/ancestral1000.png --precision fp32
run inpaint $cifar/test --ckpt $m --n 8 --resample 5 --out $out/inpaint.png
run img2img $cifar/test/horse/0001.jpg --ckpt $m --strength 0.25,0.5,0.75 --out $out/img2img.png
run interpolate --ckpt $m --frames 8 --out $out/interpolate.png
avx2 forward --data $cifar/train --out $out/cifar10_forward.png
# The MNIST pictures come from a model trained here first (train is bitwise repeatable on a CPU)
avx2 train --data mnist --preset small --data-root $mnist --out $out/mnist
avx2 sample --ckpt $out/mnist/ckpt.pt --n 100 --out $out/mnist_digits.png --precision fp32
avx2 sample --ckpt $out/mnist/ckpt.pt --n 40 --process --out $out/mnist_process.png --precision fp32
# The conditioned pictures come from docs/conditioned.sh's ×4 and colourisation models (one thread, as it ran them)
one() { OMP_NUM_THREADS=1 run "$@"; }
one train --data $cifar/train --preset small --task upscale --factor 4 --steps 1350 --sample-every 0 --out $out/sr4
one upscale $cifar/test --ckpt $out/sr4/ckpt.pt --n 8 --out $out/upscale4.png --precision fp32
one train --data $cifar/train --preset small --task colorize --steps 1350 --sample-every 0 --out $out/colour
one colorize $cifar/test --ckpt $out/colour/ckpt.pt --n 8 --out $out/colorize.png --precision fp32
status=0
for f in samples/*.png samples/*.gif; do
  if cmp -s "$f" "$out/$(basename "$f")"; then echo "same  $f"; else echo "DIFFERS $f"; status=1; fi
done
echo "remade in $out"
exit $status
