#!/usr/bin/env bash
# LeRobot's own code on an export of the lake: install LeRobot into a virtual environment of its
# own (Python 3.12; LeRobot pins a torch older than pianoforge's), export a small lake made by the
# project's fixtures, load it with LeRobotDataset, split it with LeRobot's dataset tool (which
# rebuilds stats from the per-episode stats), and train LeRobot's ACT and Diffusion policies for a
# few steps each (ACT normalises by mean/std, Diffusion by min/max).
#   tests/lerobot/check.sh [STEPS]
# Environment: LEROBOT_VERSION (0.6.1), LEROBOT_VENV (~/.cache/pianoforge/lerobot-venv, reused
# when it holds that version), PYTHON312 (a Python 3.12; default: python3.12 on PATH, else pyenv's).
set -euo pipefail
steps=${1:-20}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
version=${LEROBOT_VERSION:-0.6.1}
venv=${LEROBOT_VENV:-$HOME/.cache/pianoforge/lerobot-venv}
python312=${PYTHON312:-$(command -v python3.12 || ls -d "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/3.12*/bin/python 2>/dev/null | tail -1)}

if ! "$venv/bin/python" -c "import diffusers, lerobot, sys; sys.exit(lerobot.__version__ != '$version')" 2>/dev/null; then
    [ -x "$python312" ] || { echo "error: no Python 3.12 found; set PYTHON312" >&2; exit 2; }
    echo "== installing lerobot $version into $venv (several GB: PyPI's torch bundles CUDA)"
    start=$SECONDS
    rm -rf "$venv"
    "$python312" -m venv "$venv"
    "$venv/bin/python" -m pip install -q "lerobot[dataset,training,diffusion]==$version"
    echo "== installed in $((SECONDS - start)) s, $(du -sh "$venv" | cut -f1)"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "== a small lake and its export"
PYTHONPATH="$repo" "$repo/.venv/bin/python" "$here/make_lake.py" "$work/lake"
PYTHONPATH="$repo" "$repo/.venv/bin/pianoforge" lake export "$work/lake" --format lerobot --out "$work/dataset"

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HOME="$work/hf" WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "== LeRobotDataset and LeRobot's dataset tools"
"$venv/bin/python" "$here/check_dataset.py" "$work/dataset" "$work"

train() {  # POLICY ARGS...: lerobot-train for $steps steps on the export; fails unless it ends
    local policy=$1; shift
    echo "== lerobot-train --policy.type=$policy, $steps steps"
    "$venv/bin/lerobot-train" --dataset.repo_id=pianoforge/check --dataset.root="$work/dataset" \
        --policy.type="$policy" --policy.device=cpu --policy.push_to_hub=false "$@" \
        --batch_size=8 --steps="$steps" --log_freq=5 --num_workers=0 --save_checkpoint=false \
        --wandb.enable=false --output_dir="$work/train-$policy" 2>&1 | tee "$work/$policy.log" | grep -o "step:[0-9]* .*loss:[0-9.naif]*"
    grep -q "End of training" "$work/$policy.log"
    ! grep -o "loss:[0-9.naif]*" "$work/$policy.log" | grep -q "nan\|inf"
}
train act --policy.chunk_size=10 --policy.n_action_steps=10 --policy.dim_model=128 --policy.dim_feedforward=256
train diffusion --policy.horizon=8 --policy.n_action_steps=4 --policy.n_obs_steps=2 '--policy.down_dims=[64,128]'
echo "== LeRobot $version trained ACT and Diffusion for $steps steps each on the export"
