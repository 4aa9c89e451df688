"""Build of the one compiled part: the inverted lists of the ``"auto"`` index (plain C, loaded with ctypes).

Everything else is in ``setup.cfg``. The extension is optional: without a C compiler the install still
succeeds and :mod:`indexes.inverted_lists` uses its Python lists (a warning says so at first use).
"""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "indexes._inverted_lists",
            sources=["indexes/_inverted_lists.c"],
            extra_compile_args=[] if sys.platform == "win32" else ["-O3", "-std=c11"],
            libraries=[] if sys.platform == "win32" else ["m"],
            optional=True,
        )
    ]
)
