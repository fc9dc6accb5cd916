#!/usr/bin/env bash
# Creates the project's virtual environment and installs prm_det's stack into it.
#
#   bash tools/setup_env.sh          (what `make setup` runs)
#
# Order matters: torch + torchvision -> mmengine -> mmcv (compiled, with ops,
# for this torch) -> triton (where torch has none) -> mmdet, mmpretrain ->
# pycocotools -> prm_det (editable). Versions come from requirements.txt.
# Idempotent: a stamp keyed to requirements.txt, pyproject.toml and this script
# makes a second run return at once. The stamp is written only after every step
# and the import check succeeded, and removed before any step runs, so a failed
# setup never looks installed.
#
# Environment:
#   PRM_DET_VENV   where the environment lives (default: .venv in the repo)
#   PYTHON         interpreter used to create it (default: python3)
#   CXX            C++ compiler used for mmcv's ops (default: c++)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
venv=${PRM_DET_VENV:-$repo/.venv}
python_bin=${PYTHON:-python3}
stamp="$venv/.prm_det_setup_stamp"
key=$(cat requirements.txt pyproject.toml tools/setup_env.sh | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && [ -x "$venv/bin/python" ]; then
  echo "[setup] up to date ($venv); nothing to install."
  exit 0
fi

current_step=""
current_fix=""
step() {  # step "name" "how to fix it if it fails"
  current_step=$1
  current_fix=$2
  echo "[setup] $current_step"
}
on_error() {
  local rc=$?
  rm -f "$stamp"
  {
    echo
    echo "[setup] FAILED at step: $current_step (exit $rc)"
    echo "[setup] fix: $current_fix"
    echo "[setup] nothing is marked as installed; run 'make setup' again after the fix."
  } >&2
  exit "$rc"
}
trap on_error ERR

pin() {  # the pinned requirement line for a package, from requirements.txt
  local line
  line=$(grep -E "^$1([=<>!~ ]|$)" requirements.txt | head -n1)
  [ -n "$line" ] || { echo "requirements.txt has no line for $1" >&2; return 1; }
  echo "$line"
}

step "checking the Python interpreter ($python_bin)" \
  "install Python 3.10-3.12 with venv support (Debian: apt-get install python3 python3-venv python3-dev) or point PYTHON at one"
"$python_bin" -c 'import sys, venv; assert (3, 10) <= sys.version_info[:2] <= (3, 12), sys.version'

step "checking for a C++ compiler (${CXX:-c++}), needed to compile mmcv's ops" \
  "install one (Debian: apt-get install g++) or set CXX to a working compiler"
printf 'int main() { return 0; }\n' | "${CXX:-c++}" -x c++ - -o /dev/null

step "checking that the package index is reachable" \
  "make PyPI reachable (network, proxy) or point pip at a mirror with PIP_INDEX_URL"
"$python_bin" -m pip download --no-deps --no-cache-dir -d "$(mktemp -d)" -q "$(pin mmengine)" >/dev/null

rm -f "$stamp"
if [ ! -x "$venv/bin/python" ]; then
  step "creating the virtual environment in $venv" \
    "install venv support (Debian: apt-get install python3-venv) and remove a half-made $venv"
  "$python_bin" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)

step "installing $(pin torch) and $(pin torchvision) (a pair: MMPretrain needs torchvision)" \
  "make both wheels reachable (pip takes them from this machine's disk where they lie there, else PyPI's CUDA builds); they must be released together"
"${pip[@]}" "$(pin torch)" "$(pin torchvision)"

step "installing $(pin mmengine) and mmcv's build tools" \
  "make PyPI reachable; mmcv's setup.py needs pkg_resources (setuptools>=77.0.3,<80.9: torch's range, quiet) and builds without isolation"
"${pip[@]}" "$(pin mmengine)" 'setuptools>=77.0.3,<80.9' wheel ninja

with_cuda=$("$venv/bin/python" -c 'import torch; print(1 if torch.version.cuda else 0)')
# CUDA ops where a GPU is there to run them (a CUDA build of torch also runs
# on CPU-only machines, where nvcc may exist and the build would take hours)
gpu=$("$venv/bin/python" -c 'import torch; print(1 if torch.cuda.is_available() else 0)')
if [ "$gpu" = 1 ] && command -v nvcc >/dev/null 2>&1; then
  export FORCE_CUDA=1
  ops="CPU and CUDA ops (FORCE_CUDA=1)"
else
  ops="CPU ops"
fi
torch_version=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
# mmcv 2.1.0 asks for C++17; torch 2.14's headers need C++20 (tools/cxx20.sh)
mmcv_cxx=$("$venv/bin/python" -c 'import torch; print(tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14))')
# mmcv's wheel is built once per torch and kept by torch version: pip's own
# cache files a built wheel under one name whatever torch it was built against
# and would hand a wheel built for another torch to this one
wheels="${PRM_DET_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/prm_det/wheels}/torch-$torch_version"
mmcv_marker="$venv/.mmcv_built_for_torch"
if "$venv/bin/python" -c 'import mmcv, sys; sys.exit(0 if mmcv.__version__ == "2.1.0" else 1)' 2>/dev/null \
   && [ "$(cat "$mmcv_marker" 2>/dev/null)" = "$torch_version" ] \
   && "$venv/bin/python" -c 'from mmcv.ops import nms' 2>/dev/null; then
  echo "[setup] mmcv 2.1.0 with ops, built for torch $torch_version, is already installed"
else
  if ! compgen -G "$wheels/mmcv-2.1.0-*.whl" >/dev/null; then
    step "building $(pin mmcv) from source with its $ops, for torch $torch_version, into $wheels" \
      "read the first 'error:' above. Usual causes: no C++ compiler or Python headers (apt-get install g++ python3-dev), setuptools 82 or later in the environment (no pkg_resources), nvcc not matching torch's CUDA version"
    echo "[setup] mmcv has no wheels on PyPI: this compiles it, 15-25 minutes on 2 cores, once per torch;"
    echo "[setup] the wheel is kept in $wheels, so later setups on this machine take seconds."
    mmcv_env=(MMCV_WITH_OPS=1 "MAX_JOBS=${MAX_JOBS:-$(nproc)}")
    if [ "$mmcv_cxx" = True ]; then
      mmcv_env+=("REAL_CXX=${CXX:-c++}" "CXX=$repo/tools/cxx20.sh")
    fi
    env "${mmcv_env[@]}" "$venv/bin/python" -m pip wheel --disable-pip-version-check \
      --no-deps --no-build-isolation --no-cache-dir -w "$wheels" "$(pin mmcv)"
  fi
  step "installing $(pin mmcv) from $wheels" \
    "remove $wheels and run 'make setup' again to rebuild it"
  "$venv/bin/python" -m pip uninstall -y -q mmcv >/dev/null 2>&1 || true
  "${pip[@]}" --find-links "$wheels" "$(pin mmcv)"  # the wheel, not PyPI's source
  echo "$torch_version" > "$mmcv_marker"
fi

# A CUDA build of torch brings its own pinned Triton (pip would refuse ours
# beside it); the CPU build has none, and the tests run the Triton kernels
# through Triton's interpreter.
if [ "$with_cuda" = 0 ]; then
  step "installing $(pin triton) (the PRM kernels' language; on CPU its interpreter runs them)" \
    "make PyPI reachable; a CUDA build of torch brings its own triton instead"
  "${pip[@]}" "$(pin triton)"
fi

step "installing $(pin mmdet), $(pin mmpretrain), $(pin pycocotools), $(pin pytest), $(pin ruff), $(pin onnx), $(pin onnxruntime), $(pin onnxscript) and $(pin safetensors)" \
  "make PyPI reachable; mmdet 3.3.0 needs mmcv>=2.0.0rc4,<2.2.0, mmpretrain 1.2.0 mmcv<2.4.0"
"${pip[@]}" "$(pin mmdet)" "$(pin mmpretrain)" "$(pin pycocotools)" "$(pin pytest)" "$(pin ruff)" \
  "$(pin onnx)" "$(pin onnxruntime)" "$(pin onnxscript)" "$(pin safetensors)"

step "installing prm_det (editable)" "see pip's message above; pyproject.toml must be valid"
"${pip[@]}" --no-deps --no-build-isolation -e .

step "compiling prm_det's PRM CPU kernel (prm_det/ops/csrc/, about a minute)" \
  "run '$venv/bin/python -c \"from prm_det.ops.backends import cpu; cpu.build(verbose=True)\"' to see the compiler's error; it needs the C++ compiler checked above and ninja (installed with mmengine above)"
"$venv/bin/python" -c 'from prm_det.ops.backends import cpu; cpu.build()'

step "checking that the stack imports and mmcv's compiled ops load" \
  "run '$venv/bin/python -c \"from mmcv.ops import nms\"' to see the error; rebuild mmcv with 'rm -rf $venv && make setup'"
"$venv/bin/python" -c 'import torch, torchvision, mmengine, mmcv, mmdet, mmpretrain, pycocotools, prm_det, triton
from mmcv.ops import nms, RoIAlign, sigmoid_focal_loss
from torchvision.ops import nms as torchvision_nms
print("[setup] torch", torch.__version__, "| torchvision", torchvision.__version__,
      "| mmengine", mmengine.__version__, "| mmcv", mmcv.__version__,
      "| mmdet", mmdet.__version__, "| mmpretrain", mmpretrain.__version__,
      "| triton", triton.__version__, "| prm_det", prm_det.__version__)'

echo "$key" > "$stamp"
echo "[setup] done: $venv"
