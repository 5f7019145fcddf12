#!/bin/bash
# The README's three quickstarts as a newcomer runs them, on a fresh clone with an empty cache; prints
# each step's exit code and seconds (benchmarks/newcomer_walk.md holds a run). Usage:
#   W=/tmp/walk bash benchmarks/newcomer_walk.sh [REPO]     # REPO: what to clone (default: this checkout)
set -u
W=${W:-/tmp/walk}
REPO=${1:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}
rm -rf "$W"; mkdir -p "$W"; cd "$W"
export CLIPDISTILL_CACHE="$W/cache"   # a newcomer has no cache: shapes10 and the tiny teacher are made anew
git clone -q "$REPO" clipdistill && cd clipdistill
git log --oneline | head -1
step() { local name="$1"; shift; local t0=$(date +%s); echo "### $name: $*"; "$@" > "$W/$name.log" 2>&1; local rc=$?; echo "### $name rc=$rc $(( $(date +%s) - t0 )) s"; tail -4 "$W/$name.log"; }
step demo make demo
source .venv/bin/activate
step make-pool clipdistill make-pool --out my-pool
step fit-quick clipdistill fit-prompts --prompts my-pool/classes.txt --pool my-pool/pool --eval my-pool/eval --out runs/my-classifier --epochs 40
step predict clipdistill predict --model runs/my-classifier/model.onnx my-pool/eval/test/star/
step check-bundle clipdistill check-bundle runs/my-classifier/model.bundle
step wheel .venv/bin/pip wheel --no-deps . -w dist
deactivate
# the device: a bare venv with the wheel, numpy + Pillow + ONNX Runtime, in the copied bundle
cp -r runs/my-classifier/model.bundle "$W/jetson-copy"; cp dist/*.whl "$W/jetson-copy/"; mkdir -p "$W/jetson-copy/photos"; cp my-pool/eval/test/star/* "$W/jetson-copy/photos/" 2>/dev/null
step device-venv python3 -m venv "$W/device"
step device-install "$W/device/bin/pip" install -q "$W"/jetson-copy/clipdistill-*.whl onnxruntime
cd "$W/jetson-copy"
step device-predict "$W/device/bin/clipdistill" predict --model . photos/
echo walk done
