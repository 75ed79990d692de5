#!/usr/bin/env bash
# The `gpu` scale in one call on a GPU machine that has python3 with torch, torchvision, numpy, pillow, matplotlib,
# seaborn, pandas, opencv, pyyaml and tqdm, but neither this package installed nor papermill/jupyter/pycocotools/faiss:
# the steps run as plain Python (`--runner python`), and everything but the checkpoints comes back as ONE archive,
# OUT_DIR/gpu.tar.gz (<= 16 MiB), plus OUT_DIR/gpu_run.log. Stage the data first, here: bash scripts/gpu_stage.sh.
# Redraw on a CPU afterwards: las-reproduce --scale gpu --from-archive gpu.tar.gz
# Usage (repo root on the GPU machine): bash scripts/gpu_run.sh OUT_DIR [las-reproduce flags, e.g. --pairs 1500000]
# Run again on the same (warm) machine to resume: finished steps are skipped by their parameter hash.
# LAS_RUNS / LAS_FIGURES (default runs, figures) move the run and figures folders (the CI test of this script uses them).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_run.sh OUT_DIR [las-reproduce flags]}; shift
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ls .whl/*.whl >/dev/null 2>&1; then   # wheels staged by gpu_stage.sh (pycocotools while data.py needs it)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/las-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/las-site"
fi
log="$out/gpu_run.log" runs=${LAS_RUNS:-runs} figures=${LAS_FIGURES:-figures}
{
  date -u +'start %Y-%m-%dT%H:%M:%SZ'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$log"
start=$(date +%s)
python3 -m learn_and_search.paper.reproduce --scale gpu --runner python --runs "$runs" --figures "$figures" \
  --archive "$out/gpu.tar.gz" "$@" 2>&1 | tee -a "$log"
rc=${PIPESTATUS[0]}
echo "las-reproduce exit $rc, wall $(( $(date +%s) - start )) s" | tee -a "$log"
if [ "$rc" -ne 0 ]; then   # keep what finished: the records, logs, metrics and figures so far
  python3 -c "import sys; from learn_and_search.paper.archive import pack_run; print(pack_run(*sys.argv[1:]))" \
    "$runs/gpu" "$figures/gpu" "$out/gpu.tar.gz" 2>&1 | tee -a "$log"
fi
exit "$rc"
