#!/usr/bin/env bash
# Prepares .gpu-kit/ for benchmarks/gpu_run.sh (run on the CPU machine, from
# anywhere in the repository): the shared GPU kit and golden vectors
# (../shared/gpu-kit/pack.sh), plus pytest and its dependencies as wheels in
# .gpu-kit/extra/ (the GPU machine has no package index), at the versions
# this project's environment uses. Then, on the device:
#   . .gpu-kit/install.sh && bash benchmarks/gpu_run.sh   (carry .gpu-kit)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
bash ../shared/gpu-kit/pack.sh
pip=${PIP:-.venv/bin/pip}
pins=$("$pip" freeze 2>/dev/null | grep -i -E \
    '^(pytest|pluggy|iniconfig|packaging|pygments)==' || true)
[ -n "$pins" ] || pins=$'pytest\npluggy\niniconfig\npackaging\npygments'
mkdir -p .gpu-kit/extra
# shellcheck disable=SC2086
"$pip" download -q --no-deps --only-binary=:all: -d .gpu-kit/extra $pins
ls .gpu-kit/extra
du -sh .gpu-kit | sed 's/^/packed with pytest: /'
