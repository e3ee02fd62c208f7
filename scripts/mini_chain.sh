#!/usr/bin/env bash
# Runs the miniature's training chain in the background, resumably: CLIP and VAE (in parallel, one thread
# each), then the UNet on both cores. Safe to re-run after an interruption: every stage resumes its run.
# Usage: nohup scripts/mini_chain.sh DATA RUNS > RUNS/chain.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-/work/data/emoji}
RUNS=${2:-/work/runs}
SX=.venv/bin/stablexl

stage() {  # stage NAME TASK THREADS [extra args]: run or resume until its final weights exist
  local name=$1 task=$2 threads=$3; shift 3
  local out="$RUNS/$name" final
  case $task in clip) final=clip.safetensors ;; vae) final=vae.safetensors ;; unet) final=model.safetensors ;; esac
  [ -f "$out/$final" ] && return 0
  local resume=()
  ls "$out"/state-*.safetensors >/dev/null 2>&1 && resume=(--resume)
  $SX train "$task" --data "$DATA" --output "$out" --config "recipes/$name.json" --threads "$threads" "${resume[@]}" "$@" \
    >> "$RUNS/$name.log" 2>&1
}

if [ ! -f "$RUNS/mini-clip/clip.safetensors" ] || [ ! -f "$RUNS/mini-vae/vae.safetensors" ]; then
  # whichever of CLIP / VAE is not running yet starts here; when CLIP ends, the VAE continues on two threads
  pgrep -f "train clip .*mini-clip" >/dev/null || stage mini-clip clip 1 &
  clip_pid=$!
  pgrep -f "train vae .*mini-vae" >/dev/null || { stage mini-vae vae 1 & }
  wait "$clip_pid" 2>/dev/null
  while pgrep -f "train clip .*mini-clip" >/dev/null; do sleep 30; done
  if pgrep -f "train vae .*mini-vae" >/dev/null && [ ! -f "$RUNS/mini-vae/vae.safetensors" ]; then
    pkill -f "train vae .*mini-vae"; sleep 5   # the run resumes bit-exactly from its last state
  fi
  stage mini-vae vae 2
fi
stage mini-unet unet 2 --vae "$RUNS/mini-vae/vae.safetensors" --text-encoders "$RUNS/mini-clip/clip.safetensors"
echo "chain done: $(date)"
