#!/usr/bin/env bash
# A C++ compiler command for building mmcv 2.1.0 against torch 2.14 or later.
#
#   CXX=$PWD/tools/cxx20.sh MMCV_WITH_OPS=1 pip install --no-build-isolation mmcv==2.1.0
#
# mmcv 2.1.0's setup.py compiles its ops with -std=c++17 (the last flag on the
# command line, so CXXFLAGS cannot override it); torch 2.14's headers need C++20
# ("#error C++20 or later compatible compiler is required to use ATen").
# torch's extension builder runs $CXX: this passes every argument on to the
# real compiler (REAL_CXX, default c++) with -std=c++14/-std=c++17 replaced by
# -std=c++20. mmcv's CPU ops compile and pass their tests under C++20.
args=()
for arg in "$@"; do
  case "$arg" in
    -std=c++14|-std=c++17) args+=(-std=c++20) ;;
    *) args+=("$arg") ;;
  esac
done
exec "${REAL_CXX:-c++}" "${args[@]}"
