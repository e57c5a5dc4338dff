#!/usr/bin/env bash
# The table of "Learning faster" (docs/measurements.md): ε, ε + Min-SNR-5, v and v + Min-SNR-5, each trained at a
# fixed budget with seeds 0 and 1, two runs at a time on one core each, then scored by the model's own sampler
# (`sample`'s default: DDIM 25 steps, η 1, guidance 2):
#   MNIST:    `--preset small` (1,150 steps of 32); FID of 1,000 samples against 2,000 training digits, and the
#             accuracy of docs/digit_classifier.py on them (100 of each digit)
#   CIFAR-10: `--preset small` on the JPEG folder, CIFAR_STEPS steps of 32 (default 900: about 8 minutes on one core
#             beside another run); FID at n = 1,000 against the training set's statistics
#
#   bash docs/learning_faster.sh OUT CIFAR10_TRAIN_FOLDER MNIST_ROOT INCEPTION.pth CIFAR10_TRAIN_STATS.npz [CIFAR_STEPS]
# OUT gets a run folder per model and results.txt, a line per model (the table's cells); a model with its line there
# is skipped, so a stopped run goes on where it stopped.
set -euo pipefail
out=$1 cifar=$2 mnist=$3 inception=$4 stats=$5 cifar_steps=${6:-900}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
[ -f "$out/digits.pt" ] || python "$here/docs/digit_classifier.py" train "$out/digits.pt" "$mnist"

job() {  # data prediction gamma seed
    set -euo pipefail
    local data=$1 pred=$2 gamma=$3 seed=$4
    local run="$out/${data}_${pred}_snr${gamma}_seed${seed}"
    grep -q "^$data $pred snr_gamma=$gamma seed=$seed " "$out/results.txt" 2> /dev/null && return
    local source=$cifar steps=$cifar_steps
    if [ "$data" = mnist ]; then
        source=mnist
        steps=1150  # the preset's
    fi
    [ -f "$run/ckpt.pt" ] || OMP_NUM_THREADS=1 python "$here/ddpm.py" train --data "$source" --data-root "$mnist" \
        --preset small --prediction "$pred" --snr-gamma "$gamma" --seed "$seed" --steps "$steps" --out "$run" \
        --sample-every 0 > "$run.train.txt" 2>&1
    if [ "$data" = mnist ]; then
        OMP_NUM_THREADS=1 python "$here/ddpm.py" sample --ckpt "$run/ckpt.pt" --n 1000 --out "$run/samples/" 2> /dev/null
        fid=$(OMP_NUM_THREADS=1 python "$here/ddpm.py" fid --samples "$run/samples" --ref mnist --ref-n 2000 \
              --data-root "$mnist" --inception "$inception" --json 2> /dev/null)
        acc=$(python "$here/docs/digit_classifier.py" score "$out/digits.pt" "$run/samples")
    else
        fid=$(OMP_NUM_THREADS=1 python "$here/ddpm.py" fid --ckpt "$run/ckpt.pt" --n 1000 --ref "$stats" \
              --inception "$inception" --json 2> /dev/null)
        acc=""
    fi
    echo "$data $pred snr_gamma=$gamma seed=$seed $(tail -1 "$run/log.txt" | cut -c1-60) | $fid | $acc" \
        >> "$out/results.txt"
}
export -f job
export out cifar mnist inception stats here cifar_steps

# MNIST's reference statistics first, once (cached), with two grey images as the samples: else two jobs compute them
mkdir -p "$out/grey"
[ -f "$out/grey/1.png" ] ||
    python -c "from PIL import Image; [Image.new('L', (28, 28), 0).save(f'$out/grey/{i}.png') for i in range(2)]"
python "$here/ddpm.py" fid --samples "$out/grey" --ref mnist --ref-n 2000 --data-root "$mnist" --inception "$inception"
for data in mnist cifar10; do
    for seed in 0 1; do
        for pred in eps v; do
            for gamma in 0 5; do
                echo "$data $pred $gamma $seed"
            done
        done
    done
done | xargs -P 2 -L 1 bash -c 'job "$@"' _

# The table: each cell the mean over the seeds ± its standard error (for two seeds, half their difference)
python - "$out/results.txt" <<'PY'
import collections, json, math, re, sys
cells = collections.defaultdict(list)
for line in open(sys.argv[1]):
    data, pred, gamma, seed = line.split()[:4]
    fields = line.split(" | ")
    cells[data, pred, gamma, "fid"].append(json.loads(fields[1])["fid"])
    if data == "mnist":
        cells[data, pred, gamma, "accuracy"].append(float(re.search(r"accuracy ([\d.]+)", fields[2])[1]))
def cell(values):
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.4g} (1 seed)"
    error = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    return f"{mean:.4g} ± {error:.2g} ({', '.join(f'{v:.4g}' for v in values)})"
print("| training | MNIST FID | MNIST accuracy | CIFAR-10 FID |")
print("|---|---|---|---|")
for pred in ("eps", "v"):
    for gamma in ("snr_gamma=0", "snr_gamma=5"):
        row = [cell(cells[d, pred, gamma, m]) if cells[d, pred, gamma, m] else "–"
               for d, m in [("mnist", "fid"), ("mnist", "accuracy"), ("cifar10", "fid")]]
        name = {"eps": "ε", "v": "v"}[pred] + (" + Min-SNR-5" if gamma.endswith("5") else "")
        print(f"| {name} | " + " | ".join(row) + " |")
PY
