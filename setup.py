"""Build of the one compiled part: the inverted lists of the ``"auto"`` index (plain C, loaded with ctypes).

Everything else is in ``setup.cfg``. The extension is optional: without a C compiler the install still
succeeds and :mod:`indexes.inverted_lists` uses its Python lists (a warning says so at first use). With
a compiler that has OpenMP (``-fopenmp``: gcc, or clang with libomp) the library can split a call over
several heads across threads (the ``"faiss"`` backend's ``workers``); without it, it runs them on one.
"""

import os
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = "#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n"


def has_openmp(compiler) -> bool:
    """Whether ``compiler`` compiles and links a program with ``-fopenmp``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write(OPENMP_PROBE)
        try:
            objects = compiler.compile([source], output_dir=tmp, extra_postargs=["-fopenmp"])
            compiler.link_executable(objects, os.path.join(tmp, "probe"), extra_postargs=["-fopenmp"])
        except Exception:  # any compile or link failure: build without OpenMP
            return False
    return True


class BuildExt(build_ext):
    """``build_ext`` that adds ``-fopenmp`` where the compiler has it."""

    def build_extensions(self) -> None:
        if self.compiler.compiler_type == "unix" and has_openmp(self.compiler):
            for ext in self.extensions:
                ext.extra_compile_args = [*ext.extra_compile_args, "-fopenmp"]
                ext.extra_link_args = [*ext.extra_link_args, "-fopenmp"]
        super().build_extensions()


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "indexes._inverted_lists",
            sources=["indexes/_inverted_lists.c"],
            extra_compile_args=[] if sys.platform == "win32" else ["-O3", "-std=c11"],
            libraries=[] if sys.platform == "win32" else ["m"],
            optional=True,
        )
    ],
)
