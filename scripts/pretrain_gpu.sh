#!/usr/bin/env bash
# Train the next sam2pal-micro (v13, from the shipped v12) on a CUDA machine for a fixed
# number of minutes, from a bare Python with PyTorch (no venv, nothing fetched): the
# packages the project needs beyond PyTorch, NumPy, OpenCV and Pillow come as wheels
# from `make gpu-kit` (in .whl/).
#
#   bash scripts/pretrain_gpu.sh MINUTES OUT_DIR [WORKERS [PRETRAIN FLAGS...]]
#
# (flags after WORKERS are passed on to `sam2pal pretrain` and override the recipe below)
#
# Writes to OUT_DIR the model's record, its loss and held-out curves, its config, the
# log, and the checkpoint in two parts of at most 15 MiB (some machines return files
# of at most 16 MiB): `cat sam2pal-micro-v13.pt.part-* > sam2pal-micro-v13.pt`, then
# check it against the record's checkpoint_sha256.
#
# The episodes are those v11 and v12 were trained on (v6's to v10's, which are v5's with 40%
# zoomed crops instead of 30%, with half of the specimens' appendages moved between
# template and target; resources/models/README.md); on a GPU a step takes 16 of them, rendered by
# WORKERS processes (default: all cores but two), and the learning rate and resolution
# schedule run by the clock (`sam2pal pretrain --minutes`). The first run on an H200 (7
# minutes, resources/models/tried/gpu-7min/) set the recipe: at a peak learning rate of
# 6e-4 the loss spiked (2-4 against 0.9) and the held-out IoU fell for the first 150
# steps, and with 85% of the time at 256 px the bronze series lost its antennae and
# legs; hence v2's 2e-4 and half the time at 384 px. Each row of the loss curve says
# what share of its time the model waited for rendered episodes (wait_share).
set -euo pipefail
minutes=${1:?minutes}
out=${2:?output folder}
workers=${3:-$(($(nproc) > 3 ? $(nproc) - 2 : 1))}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}  # DEVICE=cpu: a dry run of this script on a machine without one
site=${SITE:-/tmp/sam2pal-site}
kit=${KIT:-.whl}
name=sam2pal-micro-v13
recipe=(--init sam2pal-micro --appearance mixed --low_contrast_fraction 0.4
    --zoom_fraction 0.4 --body_plan v2 --procedural_fraction 0.5 --repose_fraction 0.5)

mkdir -p "$out" "$site"
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$kit"/*.whl
export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
run=$(mktemp -d)
"$python" -m sam2pal.cli pretrain --device "$device" --workers "$workers" --minutes "$minutes" \
    --out_dir "$run" --name "$name" "${recipe[@]}" --episodes_per_step 16 \
    --steps 100000 --low_res_steps 50000 --learning_rate 2e-4 --warmup_steps 100 \
    "${@:4}" 2>&1 | tee "$out/$name.train.log"
split -b 15M -d "$run/$name.pt" "$out/$name.pt.part-"
cp "$run/$name".{yaml,training.json,training.csv,heldout.csv} "$out/"
echo "wrote $out: $(ls "$out" | tr '\n' ' ')"
