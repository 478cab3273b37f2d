"""Build script: the pure-Python package always; the CUDA extension ``kcm_cuda._C`` only when
a CUDA-enabled torch and a CUDA toolkit are present (see kcm_cuda_build.py).

Install with ``pip install --no-build-isolation .`` so that the build sees the installed torch
(an isolated build would never see it and would install the pure-Python package only).
"""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kcm_cuda_build import extension_build_config  # noqa: E402

ext_modules, cmdclass = extension_build_config()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
