"""Build configuration of the optional CUDA extension ``kcm_cuda._C`` (called by setup.py).

The extension is built only when everything it needs is present: an importable torch built
with CUDA (``torch.version.cuda``) and a CUDA toolkit (``torch.utils.cpp_extension.CUDA_HOME``
with ``bin/nvcc``). Otherwise no extension is declared and the install stays pure Python (the
``triton`` / ``torch`` backends are used): a CPU-only install never compiles anything and never
fails because of this file.

Environment:
    KCM_CUDA_BUILD=0          never build the extension
    KCM_CUDA_BUILD=1          the extension is required: fail with the reason if it cannot build
    (unset / "auto")          build it when possible
    TORCH_CUDA_ARCH_LIST      target architectures, e.g. "8.0;9.0" (torch's usual variable).
                              Unset: the visible GPUs' architectures, or with no GPU visible,
                              the architectures torch itself was built for (sm_70 and newer)
                              that this nvcc supports.

Install with ``pip install --no-build-isolation .`` so that the build sees the installed torch.
"""

from __future__ import annotations

import os
import re
import subprocess
from typing import Any

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
EXTENSION_NAME = "kcm_cuda._C"
ENV_SWITCH = "KCM_CUDA_BUILD"
MIN_ARCH = 70  # sm_70 (Volta): the oldest architecture the kernels are written for

# Exactness: no --use_fast_math (nor -ftz / approximate division or sqrt): the kernels rely on
# IEEE division and square root and on denormals being kept.
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]


def _switch() -> str:
    return os.environ.get(ENV_SWITCH, "auto").strip().lower() or "auto"


def _import_torch() -> Any | None:
    try:
        import torch
    except Exception:  # any failure means "no torch to build against"
        return None
    return torch


def skip_reason() -> str | None:
    """Why the extension will not be built here, or None when it will."""
    if _switch() in ("0", "false", "no", "off"):
        return f"{ENV_SWITCH}={os.environ.get(ENV_SWITCH)}"
    torch = _import_torch()
    if torch is None:
        return (
            "torch is not importable in the build environment (an isolated build? install "
            "with pip install --no-build-isolation .)"
        )
    if getattr(torch.version, "cuda", None) is None:
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as exc:
        return f"torch.utils.cpp_extension is unusable: {exc}"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME to the toolkit that has bin/nvcc)"
    if not os.path.exists(_nvcc(CUDA_HOME)):
        return f"CUDA_HOME={CUDA_HOME} has no bin/nvcc"
    if not os.path.isfile(os.path.join(ROOT, CSRC, "bindings.cpp")):
        return f"the CUDA sources ({CSRC}/) are not in this source tree"
    return None


def _nvcc(cuda_home: str) -> str:
    return os.path.join(cuda_home, "bin", "nvcc.exe" if os.name == "nt" else "nvcc")


def _nvcc_archs(cuda_home: str) -> set[int] | None:
    """The sm numbers this nvcc can compile for (None if it cannot say)."""
    try:
        out = subprocess.run(
            [_nvcc(cuda_home), "--list-gpu-arch"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = {int(m) for m in re.findall(r"compute_(\d+)", out)}
    return found or None


def arch_flags(torch: Any, cuda_home: str) -> list[str]:
    """Explicit -gencode flags, or [] to let torch choose (TORCH_CUDA_ARCH_LIST or GPUs)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    try:
        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            return []
    except Exception:  # a broken driver: build for torch's own list
        pass
    # No GPU visible (a build machine): torch's own default would fail; use the architectures
    # torch was built for.
    archs = sorted(
        {
            int(a[3:])
            for a in torch.cuda.get_arch_list()
            if a.startswith("sm_") and a[3:].isdigit() and int(a[3:]) >= MIN_ARCH
        }
    )
    supported = _nvcc_archs(cuda_home)
    if supported is not None:
        archs = [a for a in archs if a in supported]
    if not archs:
        return []
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")  # PTX for newer
    return flags


def _sources() -> tuple[list[str], list[str]]:
    names = sorted(os.listdir(os.path.join(ROOT, CSRC)))
    sources = [f"{CSRC}/{n}" for n in names if n.endswith((".cu", ".cpp"))]
    headers = [f"{CSRC}/{n}" for n in names if n.endswith((".h", ".cuh"))]
    return sources, headers


def cuda_extension_modules() -> list[Any]:
    """[CUDAExtension("kcm_cuda._C", ...)] when it can be built here, else []."""
    reason = skip_reason()
    if reason is not None:
        if _switch() in ("1", "true", "yes", "on"):
            raise RuntimeError(f"{ENV_SWITCH}=1 but the CUDA extension cannot be built: {reason}")
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension

    sources, headers = _sources()
    return [
        CUDAExtension(
            name=EXTENSION_NAME,
            sources=sources,
            depends=headers,
            include_dirs=[os.path.join(ROOT, CSRC)],
            extra_compile_args={
                "cxx": list(CXX_FLAGS),
                "nvcc": list(NVCC_FLAGS) + arch_flags(torch, CUDA_HOME),
            },
        )
    ]


def extension_build_config() -> tuple[list[Any], dict[str, Any]]:
    """(ext_modules, cmdclass) for setup(): both empty when the extension is not built."""
    modules = cuda_extension_modules()
    if not modules:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension

    return modules, {"build_ext": BuildExtension}
