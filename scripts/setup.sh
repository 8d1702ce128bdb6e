#!/usr/bin/env bash
# Installs what mixedmodels needs on a fresh Debian machine (run as root): CHOLMOD's
# headers and library from Debian, then this package (editable) with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
# OpenBLAS: CHOLMOD's supernodal factorization runs its dense blocks through BLAS, and
# Debian's reference BLAS is several times slower.
if { [ ! -f /usr/include/suitesparse/cholmod.h ] && [ -z "${SUITESPARSE_INCLUDE_DIR:-}" ]; } || ! ls /usr/lib/x86_64-linux-gnu/openblas-pthread/ >/dev/null 2>&1; then
  echo "setup: installing libsuitesparse-dev and libopenblas0-pthread with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libsuitesparse-dev libopenblas0-pthread >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "Running pip as the 'root' user" || true
python3 -c "import mixedmodels._linalg._cholmod" || { echo "setup: the build of mixedmodels failed" >&2; exit 1; }
