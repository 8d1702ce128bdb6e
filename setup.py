"""Only the extension modules and where CHOLMOD lives; metadata is in pyproject.toml.

CHOLMOD comes from SuiteSparse (Debian: ``apt-get install libsuitesparse-dev``). Override
the locations with SUITESPARSE_INCLUDE_DIR and SUITESPARSE_LIBRARY_DIR.
"""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

include_dirs = [
    os.environ.get("SUITESPARSE_INCLUDE_DIR", "/usr/include/suitesparse"),
    "csrc",
    numpy.get_include(),
]
library_dirs = [d for d in [os.environ.get("SUITESPARSE_LIBRARY_DIR")] if d]
compile_args = ["-O3"]


def ext(name, sources, libraries=(), openmp=False):
    # OpenMP only where CHOLMOD is: the shim switches CHOLMOD's OpenMP regions to one
    # thread, which needs the same OpenMP runtime CHOLMOD was linked with (libgomp)
    omp = ["-fopenmp"] if openmp else []
    return Extension(
        name,
        sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=list(libraries),
        extra_compile_args=compile_args + omp,
        extra_link_args=omp,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


extensions = [
    ext("mixedmodels._linalg._cholmod",
        ["src/mixedmodels/_linalg/_cholmod.pyx", "csrc/mm_cholmod.c"], ["cholmod"], openmp=True),
    ext("mixedmodels._linalg._blocked", ["src/mixedmodels/_linalg/_blocked.pyx"]),
    ext("mixedmodels._linalg._densetail", ["src/mixedmodels/_linalg/_densetail.pyx"]),
    ext("mixedmodels._kernels._glm", ["src/mixedmodels/_kernels/_glm.pyx"]),
    ext("mixedmodels._kernels._gradient", ["src/mixedmodels/_kernels/_gradient.pyx"]),
    ext("mixedmodels._kernels._lmm_gradient", ["src/mixedmodels/_kernels/_lmm_gradient.pyx"]),
    ext("mixedmodels._kernels._agq", ["src/mixedmodels/_kernels/_agq.pyx"]),
    # dlsym finds NLopt's C API in the nlopt package's own extension (see the module)
    ext("mixedmodels._kernels._search", ["src/mixedmodels/_kernels/_search.pyx"], ["dl"]),
    ext("mixedmodels._kernels._check", ["src/mixedmodels/_kernels/_check.pyx"]),
    ext("mixedmodels._kernels._factorize", ["src/mixedmodels/_kernels/_factorize.pyx"]),
    ext("mixedmodels._kernels._dense", ["src/mixedmodels/_kernels/_dense.pyx"]),
]
# MM_BUILD_ONLY=mixedmodels._kernels._glm,... rebuilds just those modules (work on one
# kernel while another is half-edited)
_only = os.environ.get("MM_BUILD_ONLY")
if _only:
    extensions = [e for e in extensions if e.name in _only.split(",")]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        include_path=["src"],
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
