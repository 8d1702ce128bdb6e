"""The self-contained wheel (scripts/build_wheel.sh) installed into a fresh venv.

Slow (run with ``-m slow``): it builds the wheel (about two minutes) and installs NumPy,
SciPy, pandas, patsy and nlopt into a new venv. MM_TEST_WHEEL=path tests a wheel built
before instead of building one. The checks run from a directory outside the repository,
so the installed package is imported, not src/:

- the wheel is tagged manylinux and carries CHOLMOD and its BLAS in mixedmodels.libs/;
- ldd resolves every library the extensions need either in mixedmodels.libs/ or to the
  few system libraries the manylinux policy allows (glibc, libgcc_s);
- a fit reproduces lme4's objective (sleepstudy, block-diagonal path; penicillin, CHOLMOD
  path), and /proc/self/maps shows no SuiteSparse or BLAS mapped from outside the venv;
- the same fit in a private mount namespace in which the system's SuiteSparse, METIS,
  BLAS/LAPACK, libgomp and libgfortran files are covered by /dev/null (nothing outside
  that namespace changes).
"""
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import OBJECTIVE_ABS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# The libraries that Debian's libcholmod brings in and auditwheel must vendor.
VENDORED_PREFIXES = ("libcholmod", "libamd", "libcamd", "libccolamd", "libcolamd",
                     "libsuitesparseconfig", "libmetis", "libblas", "liblapack", "libopenblas",
                     "libgomp", "libgfortran", "libquadmath")
# What may still come from the system: glibc and libgcc_s (manylinux policy).
SYSTEM_ALLOWED = ("linux-vdso.so.1", "libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0",
                  "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2")

CHECK = r'''
import ctypes, json, os, sys
out = {}
if os.environ.get("MM_EXPECT_HIDDEN") == "1":
    try:
        ctypes.CDLL("libcholmod.so.3")
        out["system_cholmod_loadable"] = True
    except OSError as e:
        out["system_cholmod_loadable"] = False
        out["system_cholmod_error"] = str(e)
import mixedmodels as mm
out["module"] = mm.__file__
m = mm.fit("reaction ~ 1 + days + (1 + days | subj)", mm.dataset("sleepstudy"))
out["sleepstudy"] = {"objective": float(m.objective), "path": m.model.path}
m = mm.fit("diameter ~ 1 + (1 | plate) + (1 | sample)", mm.dataset("penicillin"))
out["penicillin"] = {"objective": float(m.objective), "path": m.model.path}
maps = set()
with open("/proc/self/maps") as f:
    for line in f:
        parts = line.split()
        if len(parts) >= 6 and ".so" in parts[5]:
            maps.add(parts[5])
out["maps"] = sorted(maps)
print(json.dumps(out))
'''


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", _env()), **kw)


@pytest.fixture(scope="module")
def wheel():
    given = os.environ.get("MM_TEST_WHEEL")
    if given:
        path = Path(given).resolve()
    else:
        env = _env()
        env["PYTHON"] = sys.executable  # a wheel for the Python that runs the tests
        r = _run(["bash", str(ROOT / "scripts" / "build_wheel.sh")], cwd=ROOT, env=env)
        assert r.returncode == 0, f"build_wheel.sh failed:\n{r.stderr[-4000:]}"
        path = Path(r.stdout.strip().splitlines()[-1])
    assert path.is_file(), path
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel-venv")
    r = _run([sys.executable, "-m", "venv", str(base / "venv")])
    assert r.returncode == 0, r.stderr
    python = base / "venv" / "bin" / "python"
    r = _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
             cwd=base)
    assert r.returncode == 0, f"pip install of {wheel.name} failed:\n{r.stderr[-4000:]}"
    r = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"], cwd=base)
    site = Path(r.stdout.strip())
    assert (site / "mixedmodels" / "__init__.py").is_file()
    return {"python": python, "site": site, "cwd": base}


def _check(venv, lme4_ref, prefix=(), expect_hidden=False):
    env = _env()
    if expect_hidden:
        env["MM_EXPECT_HIDDEN"] = "1"
    script = venv["cwd"] / "check_fit.py"
    script.write_text(CHECK)
    r = _run([*prefix, str(venv["python"]), str(script)], cwd=venv["cwd"], env=env)
    assert r.returncode == 0, f"the check failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    out = json.loads(r.stdout.strip().splitlines()[-1])

    assert Path(out["module"]).resolve().is_relative_to(venv["site"].resolve()), out["module"]
    assert out["sleepstudy"]["path"] == "block-diagonal"
    assert out["penicillin"]["path"] == "dense-tail"
    for name, key in (("sleepstudy_ml", "sleepstudy"), ("penicillin_crossed", "penicillin")):
        ref = lme4_ref[name]["lme4"]["objective"]
        assert out[key]["objective"] == pytest.approx(ref, abs=OBJECTIVE_ABS), name
    assert lme4_ref["sleepstudy_ml"]["lme4"]["objective"] == pytest.approx(1751.9393444632, abs=1e-9)

    libs = venv["site"].resolve() / "mixedmodels.libs"
    mapped_cholmod = [p for p in out["maps"] if os.path.basename(p).startswith("libcholmod")]
    assert mapped_cholmod and all(Path(p).parent == libs for p in mapped_cholmod), mapped_cholmod
    outside = [p for p in out["maps"]
               if os.path.basename(p).startswith(VENDORED_PREFIXES)
               and not Path(p).resolve().is_relative_to(venv["site"].resolve())]
    assert not outside, f"mapped from the system, not the wheel: {outside}"
    return out


def test_wheel_is_manylinux_and_vendors_cholmod(wheel):
    import zipfile
    assert "-manylinux_" in wheel.name, wheel.name
    libs = [n.split("/", 1)[1] for n in zipfile.ZipFile(wheel).namelist()
            if n.startswith("mixedmodels.libs/") and not n.endswith("/")]
    for prefix in ("libcholmod", "libamd", "libcolamd", "libsuitesparseconfig", "libmetis",
                   "libopenblas", "libgomp", "libgfortran"):
        assert any(n.startswith(prefix) for n in libs), (prefix, libs)
    auditwheel = ROOT / "build" / "wheel-tools" / "bin" / "auditwheel"
    if not auditwheel.exists():  # MM_TEST_WHEEL given and the tools never built here
        auditwheel = Path(shutil.which("auditwheel") or "auditwheel")
    r = _run([str(auditwheel), "show", str(wheel)])
    assert r.returncode == 0, r.stderr
    plat = wheel.name.rsplit("-", 1)[1].removesuffix(".whl")
    assert f'consistent with the following platform tag: "{plat}"' in " ".join(r.stdout.split()), r.stdout


def test_extensions_resolve_libraries_from_the_wheel(venv):
    libs = venv["site"].resolve() / "mixedmodels.libs"
    exts = sorted((venv["site"] / "mixedmodels").rglob("*.so"))
    assert {"_cholmod", "_blocked", "_glm"} <= {e.name.split(".")[0] for e in exts}, exts
    for ext in exts:
        r = _run(["ldd", str(ext)])
        assert r.returncode == 0, r.stderr
        assert "not found" not in r.stdout, r.stdout
        resolved = {}
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] == "=>":
                resolved[parts[0]] = Path(parts[2]).resolve()
        for name, where in resolved.items():
            if where.parent == libs:
                continue
            assert name in SYSTEM_ALLOWED, f"{ext.name}: {name} resolves to {where}, outside the wheel"
        if ext.name.startswith("_cholmod"):
            needed = {n.split("-")[0] for n, w in resolved.items() if w.parent == libs}
            for prefix in ("libcholmod", "libamd", "libcolamd", "libsuitesparseconfig", "libmetis",
                           "libblas", "liblapack", "libgomp"):
                assert prefix in needed, (prefix, resolved)


def test_fit_from_installed_wheel(venv, lme4_ref):
    _check(venv, lme4_ref)


def _system_files_to_hide():
    found = set()
    for d in ("/usr/lib", "/usr/lib/*", "/usr/lib/*/*", "/usr/local/lib", "/lib64"):
        for prefix in VENDORED_PREFIXES:
            for p in glob.glob(f"{d}/{prefix}*.so*"):
                real = os.path.realpath(p)
                if os.path.isfile(real) and not real.startswith(("/usr/lib/python", "/usr/local/lib/python")):
                    found.add(real)
    return sorted(found)


def test_fit_with_system_libraries_hidden(venv, lme4_ref):
    probe = _run(["unshare", "--mount", "--propagation", "private", "true"])
    if os.geteuid() != 0 or probe.returncode != 0:
        pytest.skip(f"no private mount namespace here (unshare: {probe.stderr.strip()})")
    hide = _system_files_to_hide()
    # the build needed them, so they are on this machine: hiding must cover CHOLMOD and BLAS
    assert any(os.path.basename(p).startswith("libcholmod") for p in hide), hide
    assert any(os.path.basename(p).startswith(("libblas", "libopenblas")) for p in hide), hide
    mounts = " && ".join(f"mount --bind /dev/null '{p}'" for p in hide)
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mounts} && exec "$@"', "sh"]
    out = _check(venv, lme4_ref, prefix=prefix, expect_hidden=True)
    assert out["system_cholmod_loadable"] is False, "the system's libcholmod was still loadable"
