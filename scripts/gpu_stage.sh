#!/usr/bin/env bash
# Stage what the `gpu` scale's device run needs, here, before the call: the two small data folders copied into data/
# (git-ignored, so they travel only when the call carries them: carry ["data", ".whl"]), the pycocotools wheel into
# .whl/ while learn_and_search.data.images still imports pycocotools (the GPU machine has none; 0.4 MB), then the size of what
# travels. The device call: run(command="bash scripts/gpu_run.sh $OUT", carry=["data", ".whl"], timeout_s=600).
# Usage: bash scripts/gpu_stage.sh [SHARED_DATA]   (default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-../shared/data}
mkdir -p data
for d in coco-unlabeled-256 coco-mini-320; do
  [ -d "$src/$d" ] || { echo "gpu_stage: $src/$d not found" >&2; exit 2; }
  rm -rf "data/$d.tmp"; cp -a "$src/$d" "data/$d.tmp"; rm -rf "data/$d"; mv "data/$d.tmp" "data/$d"
done
rm -rf .whl/pycocotools-*.whl
if grep -rq --include='*.py' '^from pycocotools\|^import pycocotools' learn_and_search; then
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pycocotools==2.0.11
fi
python3 - <<'PY'
import os, subprocess
files = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], capture_output=True,
                       check=True).stdout.decode().split('\0')
code = sum(os.path.getsize(f) for f in files if f and os.path.isfile(f))
data = sum(os.path.getsize(os.path.join(r, f)) for d in ('data', '.whl') for r, _, fs in os.walk(d) for f in fs)
MiB = 2**20
print(f"code {code / MiB:.1f} MiB + data and wheels {data / MiB:.1f} MiB = {(code + data) / MiB:.1f} MiB of the 64 MiB "
      'that travel (carry ["data", ".whl"])')
if code + data > 64 * MiB: raise SystemExit('gpu_stage: over 64 MiB')
PY
