"""Compile checks of the CUDA extension's sources, which need no GPU.

* every csrc/*.cu compiles with nvcc (-c, no link) for sm_75, sm_80 and sm_90 in one nvcc call
  per file, with all warnings as errors and register spills / local memory reported as errors;
  ptxas's resource report, per architecture: the tiled GEMM kernels fit their launch bounds
  (256 threads, 2 blocks per SM: <= 128 registers), no kernel has a stack frame or spills;
* the PTX of every architecture declares .maxntid 256 / .minnctapersm 2 on the GEMM kernels
  (the old tf32 variants asked for 1 block per SM even on sm_70/75, where they compiled to the
  same FMA code), has no tensor-core instruction (the WMMA path is retired), and IEEE division
  and square root only (no approximate or flush-to-zero forms: no fast math);
* csrc/bindings.cpp compiles against the installed torch headers, takes its "str" arguments
  as std::string (torch >= 2.4; std::string_view needs a much newer torch) and guards the
  device (c10::cuda::CUDAGuard) in every CUDA operator;
* bindings.cpp defines the schemas that kcm_cuda/kernels/cuda.py defines, and its
  TORCH_LIBRARY block built alone (CPU, no CUDA kernels) as kcm_cuda._C works with cuda.py's
  Python registrations (the path of a machine with the extension; opcheck passes);
* kcm_cuda_build.py declares no extension where it cannot be built (this CPU torch).

Skipped with the reason when nvcc / a C++ compiler / the torch headers are not there.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))
ARCHS = (75, 80, 90)
COMPILE_TIMEOUT = 600

sys.path.insert(0, str(ROOT))
import kcm_cuda_build  # noqa: E402


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) not found")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _nvcc_archs() -> set[int]:
    out = subprocess.run([NVCC, "--list-gpu-arch"], capture_output=True, text=True).stdout
    return {int(a) for a in re.findall(r"compute_(\d+)", out)}


def test_sources_present():
    names = {p.name for p in CSRC.iterdir()}
    assert {"rbf_kernel.cu", "convex_update.cu", "kcm_kernels.h", "bindings.cpp"} <= names


# The tiled GEMM kernels (launch bounds 256 threads x 2 blocks per SM).
GEMM_KERNELS = ("rbf_tile_kernel", "convex_update_kernel")
MAX_GEMM_REGISTERS = 65536 // (256 * 2)


def _ptxas_report(stderr: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(mangled kernel, sm_xx): {registers, stack, spill_stores, spill_loads}} from -Xptxas -v."""
    report: dict[tuple[str, str], dict[str, int]] = {}
    key = None
    for line in stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            key = (m.group(1), m.group(2))
            report[key] = {}
            continue
        if key is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill", line)
        if m:
            report[key].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            report[key]["registers"] = int(m[1])
    return report


@needs_nvcc
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cu_compiles_for_sm75_sm80_sm90(source: Path, tmp_path: Path):
    archs = [a for a in ARCHS if a in _nvcc_archs()]
    if not archs:
        pytest.skip(f"this nvcc supports none of sm_{ARCHS}")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    proc = _run(
        [
            NVCC, "-c", "-std=c++17", "-O3", *gencode,
            "-Werror", "all-warnings",
            "-Xcompiler", "-Wall,-Wextra",
            "-Xptxas", "-v,-warn-spills,-warn-lmem-usage",
            "-o", str(tmp_path / (source.stem + ".o")), str(source),
        ]
    )  # fmt: skip
    report = _ptxas_report(proc.stderr)
    assert {arch for _, arch in report} == {f"sm_{a}" for a in archs}, proc.stderr[-3000:]
    gemm_seen = set()
    for (kernel, arch), usage in report.items():
        assert usage.get("stack") == 0 and usage.get("spill_stores") == 0, (kernel, arch, usage)
        assert usage.get("spill_loads") == 0, (kernel, arch, usage)
        if any(name in kernel for name in GEMM_KERNELS):
            gemm_seen.add(arch)
            assert usage["registers"] <= MAX_GEMM_REGISTERS, (kernel, arch, usage)
    assert gemm_seen == {f"sm_{a}" for a in archs}, "no GEMM kernel in the report"


def _ptx(source: Path, arch: int, tmp_path: Path) -> str:
    if arch not in _nvcc_archs():
        pytest.skip(f"this nvcc cannot target compute_{arch}")
    out = tmp_path / f"{source.stem}.{arch}.ptx"
    _run([NVCC, "-ptx", "-std=c++20", "-O3", f"-arch=compute_{arch}", "-o", str(out), str(source)])
    return out.read_text()


def _entries(ptx: str) -> dict[str, str]:
    """{kernel name: its PTX header (from .entry up to the opening brace)}."""
    return {
        m.group(1): m.group(0)
        for m in re.finditer(r"\.entry\s+(\w+)\s*\((?:[^)]*)\)([^{]*)", ptx)
    }


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_ptx_launch_bounds_and_ieee_math(source: Path, arch: int, tmp_path: Path):
    ptx = _ptx(source, arch, tmp_path)
    entries = _entries(ptx)
    gemm = {k: v for k, v in entries.items() if any(name in k for name in GEMM_KERNELS)}
    assert gemm, f"no GEMM kernel in {source.name}"
    for name, header in gemm.items():
        assert re.search(r"\.maxntid\s+256,\s*1,\s*1", header), (name, header)
        assert re.search(r"\.minnctapersm\s+2\b", header), (name, header)
    assert "mma.sync" not in ptx and "cvt.rna.tf32" not in ptx, "the WMMA path is retired"
    assert "fma.rn.f32" in ptx
    if source.name == "convex_update.cu":
        assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
    # expf's own (accurate) implementation uses ex2.approx.ftz internally; the arithmetic
    # around it must be IEEE.
    fast = re.search(r"\b(div|sqrt|rcp|add|sub|mul|fma)(\.\w+)*?\.(approx|ftz)\b", ptx)
    assert fast is None, f"no fast math: {fast and fast.group(0)}"


def _torch_include_flags() -> list[str] | None:
    from torch.utils.cpp_extension import include_paths

    paths = [Path(p) for p in include_paths()]
    if not (paths[0] / "torch" / "library.h").exists():
        return None
    flags = [f"-isystem{p}" for p in paths]
    # CPU wheels ship the c10/cuda headers without the CMake-generated macro file.
    if not (paths[0] / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def _cuda_include() -> Path | None:
    """The toolkit's include directory, as nvcc itself reports it (nvcc may be a wrapper)."""
    proc = subprocess.run(
        [NVCC, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    candidates = [Path(p) for p in re.findall(r'INCLUDES="-I([^"]+)"', proc.stdout + proc.stderr)]
    candidates += [Path(NVCC).resolve().parent.parent / "include", Path("/usr/local/cuda/include")]
    for path in candidates:
        if (path / "cuda_runtime_api.h").exists():
            return path
    return None


# KCM_OLD_TORCH_INCLUDE=<torch/include of an old torch, e.g. 2.4.1 unpacked from its wheel>
# adds a compile of bindings.cpp against those headers (the oldest torch pyproject allows).
OLD_TORCH_INCLUDE = os.environ.get("KCM_OLD_TORCH_INCLUDE")


@needs_nvcc
@pytest.mark.parametrize("headers", ["installed", "old"])
def test_bindings_compile_against_torch_headers(headers: str):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler found")
    if headers == "old":
        if not OLD_TORCH_INCLUDE:
            pytest.skip("KCM_OLD_TORCH_INCLUDE not set")
        inc = Path(OLD_TORCH_INCLUDE)
        torch_flags = [f"-isystem{inc}", f"-isystem{inc / 'torch/csrc/api/include'}"]
        abi = 0  # the PyPI wheels before torch 2.7 use the old C++ ABI
        std = "-std=c++17"  # what torch 2.4 builds extensions with
    else:
        torch_flags = _torch_include_flags()
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        std = "-std=c++20"
    if torch_flags is None:
        pytest.skip("the installed torch has no C++ headers")
    cuda_include = _cuda_include()
    if cuda_include is None:
        pytest.skip("cuda_runtime_api.h of the CUDA toolkit not found")
    _run(
        [
            cxx, "-fsyntax-only", std, "-Wall", "-Wextra", "-Werror",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H", *torch_flags,
            f"-isystem{cuda_include}", f"-isystem{sysconfig.get_paths()['include']}",
            str(CSRC / "bindings.cpp"),
        ]
    )  # fmt: skip


def _function_bodies(text: str, pattern: str) -> dict[str, str]:
    """{name: body} of the C++ functions whose name matches ``pattern`` (brace matching)."""
    bodies = {}
    for m in re.finditer(rf"\b({pattern})\(", text):
        start = text.index("{", m.end())
        if text.rfind(";", m.end(), start) != -1:  # a declaration or a call, not a definition
            continue
        depth, i = 0, start
        while True:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
        bodies[m.group(1)] = text[start:i]
    return bodies


def test_bindings_portable_string_args_and_device_guards():
    text = (CSRC / "bindings.cpp").read_text()
    code = re.sub(r"//[^\n]*", "", text)
    assert "string_view" not in code, "std::string_view kernel args need torch >= 2.13"
    impls = re.findall(r'm\.impl\("\w+",\s*&(\w+)\)', code)
    assert sorted(impls) == ["convex_update_cuda", "rbf_kernel_cuda"]
    bodies = _function_bodies(code, "|".join(impls))
    assert sorted(bodies) == sorted(impls)
    for name, body in bodies.items():
        guard = body.find("c10::cuda::CUDAGuard")
        assert guard != -1, f"{name} has no device guard"
        # The guard comes before the first allocation and the first launch.
        for use in ("at::empty", "getCurrentCUDAStream", "launch_"):
            assert body.find(use) == -1 or body.find(use) > guard, (name, use)
        assert re.search(r"std::string \w+\)", text[text.index(name) :]), name


def test_bindings_define_the_python_schemas():
    from kcm_cuda.kernels import cuda

    text = (CSRC / "bindings.cpp").read_text()
    defined = re.findall(r'm\.def\("([^"]+)"\)', text)
    assert sorted(defined) == sorted(cuda.SCHEMAS.values())
    assert "TORCH_LIBRARY(kcm, m)" in text and "TORCH_LIBRARY_IMPL(kcm, CUDA, m)" in text
    # register_fake on a C++-defined op requires the C++ side to name the registering module.
    assert f'm.set_python_module("{cuda.__name__}")' in text


_EXTENSION_PATH_SCRIPT = """
import sys
from torch.utils.cpp_extension import load
mod = load(name="_C", sources=[sys.argv[1]], build_directory=sys.argv[2], is_python_module=True)
sys.modules["kcm_cuda._C"] = mod  # stands in for the compiled extension
import torch
from kcm_cuda.kernels import cuda
assert cuda.extension_loaded() and cuda.schema_source() == "extension", cuda.schema_source()
x, K, C = torch.randn(9, 4), torch.rand(2, 6, 6), torch.rand(2, 6, 6)
torch.library.opcheck(torch.ops.kcm.rbf_kernel.default, (x, None, 1.0, "tf32"))
torch.library.opcheck(torch.ops.kcm.convex_update.default, (K, C, "ieee"))
print("EXTENSION-PATH-OK")
"""


def test_extension_defined_schemas_work_with_python_registrations(tmp_path: Path):
    """The path of a machine with the extension, on the CPU: bindings.cpp's TORCH_LIBRARY block
    (without the CUDA kernels) built as kcm_cuda._C defines the schemas; cuda.py must then
    skip its own definitions and add the CPU kernels and fake impls (opcheck passes)."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler found")
    text = (CSRC / "bindings.cpp").read_text()
    block = text[text.index("TORCH_LIBRARY(kcm, m)") : text.index("TORCH_LIBRARY_IMPL(")]
    pyinit = text[text.index("PyMODINIT_FUNC") :]
    source = tmp_path / "schema_only.cpp"
    source.write_text(f"#include <Python.h>\n#include <torch/library.h>\n{block}\n{pyinit}")
    build = tmp_path / "build"
    build.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", _EXTENSION_PATH_SCRIPT, str(source), str(build)],
        capture_output=True,
        text=True,
        timeout=COMPILE_TIMEOUT,
        cwd=ROOT,
    )
    if "Ninja is required" in proc.stderr:
        pytest.skip("torch.utils.cpp_extension.load needs ninja")
    assert proc.returncode == 0 and "EXTENSION-PATH-OK" in proc.stdout, proc.stderr[-4000:]


# ---------------------------------------------------------------- kcm_cuda_build.py


def test_build_config_cpu_torch_declares_nothing(monkeypatch):
    monkeypatch.delenv(kcm_cuda_build.ENV_SWITCH, raising=False)
    if torch.version.cuda is not None:
        pytest.skip("torch is a CUDA build here")
    assert kcm_cuda_build.skip_reason() is not None
    assert kcm_cuda_build.cuda_extension_modules() == []
    assert kcm_cuda_build.extension_build_config() == ([], {})


def test_build_switch(monkeypatch):
    monkeypatch.setenv(kcm_cuda_build.ENV_SWITCH, "0")
    assert kcm_cuda_build.extension_build_config() == ([], {})
    monkeypatch.setenv(kcm_cuda_build.ENV_SWITCH, "1")
    if kcm_cuda_build.skip_reason() is not None:
        with pytest.raises(RuntimeError, match="cannot be built"):
            kcm_cuda_build.cuda_extension_modules()


def test_build_sources_and_flags():
    sources, headers = kcm_cuda_build._sources()
    assert "csrc/bindings.cpp" in sources and "csrc/rbf_kernel.cu" in sources
    assert "csrc/convex_update.cu" in sources and "csrc/kcm_kernels.h" in headers
    assert "--use_fast_math" not in kcm_cuda_build.NVCC_FLAGS


class _FakeCuda:
    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def device_count() -> int:
        return 0

    @staticmethod
    def get_arch_list() -> list[str]:
        return ["sm_50", "sm_75", "sm_80", "sm_90", "sm_90a", "compute_90"]


class _FakeTorch:
    cuda = _FakeCuda()


def test_arch_flags_without_gpu(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(kcm_cuda_build, "_nvcc_archs", lambda home: {75, 80, 86, 90})
    flags = kcm_cuda_build.arch_flags(_FakeTorch(), "/nonexistent")
    assert flags == [
        "-gencode=arch=compute_75,code=sm_75",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert kcm_cuda_build.arch_flags(_FakeTorch(), "/nonexistent") == []


# ---------------------------------------------------------------- sm_70 (V100) device code

_NVRTC_STUBS = {
    # NVRTC has no C++ standard library headers and declares cudaError_t / cudaStream_t itself.
    "cstdint": "#pragma once\ntypedef int int32_t; typedef long long int64_t; "
    "typedef unsigned int uint32_t; typedef unsigned long long uint64_t; "
    "typedef unsigned long uintptr_t;\nnamespace std { using ::int32_t; using ::int64_t; "
    "using ::uint32_t; using ::uint64_t; using ::uintptr_t; }\n",
    "cuda_runtime.h": "#pragma once\n",
}
DRIVER = ROOT / "tests" / "csrc_emulator" / "nvrtc_sm70_driver.cu"


def _cuda12_tools() -> tuple[Path, Path, Path] | None:
    """(libnvrtc.so.12, ptxas, runtime include dir) of the nvidia-*-cu12 wheels, found as
    installed packages or under $KCM_CU12_SITE (a folder the wheels were unpacked into)."""
    roots = []
    if os.environ.get("KCM_CU12_SITE"):
        roots.append(Path(os.environ["KCM_CU12_SITE"]) / "nvidia")
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        roots += [Path(p) for p in nvidia.__path__]
    except ImportError:
        pass
    for root in roots:
        nvrtc = root / "cuda_nvrtc" / "lib" / "libnvrtc.so.12"
        ptxas = root / "cuda_nvcc" / "bin" / "ptxas"
        include = root / "cuda_runtime" / "include"
        if nvrtc.exists() and ptxas.exists() and (include / "cuda_fp16.h").exists():
            return nvrtc, ptxas, include
    return None


def _nvrtc_ptx(nvrtc: Path, include: Path, arch: str) -> str:
    import ctypes

    lib = ctypes.CDLL(str(nvrtc))
    prog = ctypes.c_void_p()
    names = (ctypes.c_char_p * len(_NVRTC_STUBS))(*(k.encode() for k in _NVRTC_STUBS))
    bodies = (ctypes.c_char_p * len(_NVRTC_STUBS))(*(v.encode() for v in _NVRTC_STUBS.values()))
    rc = lib.nvrtcCreateProgram(
        ctypes.byref(prog), DRIVER.read_bytes(), b"driver.cu", len(_NVRTC_STUBS), bodies, names
    )
    assert rc == 0, f"nvrtcCreateProgram: {rc}"
    opts = [f"--gpu-architecture={arch}", "-std=c++17", "-default-device", f"-I{CSRC}",
            f"-I{include}"]  # fmt: skip
    arr = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, f"NVRTC failed ({rc}):\n{log.value.decode()[-4000:]}"
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value.decode()


def _global_kernels(text: str) -> set[str]:
    return set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\(", text))


def test_sm70_driver_has_every_kernel():
    in_csrc = set().union(*(_global_kernels(p.read_text()) for p in CU_SOURCES))
    assert in_csrc and _global_kernels(DRIVER.read_text()) == in_csrc


def test_sm70_device_code(tmp_path: Path):
    """V100: the kernels through CUDA 12's NVRTC (compute_70 PTX) and ptxas (sm_70 SASS):
    no stack frame or spills, the GEMM kernels within their 128 registers."""
    tools = _cuda12_tools()
    if tools is None:
        pytest.skip("nvidia-cuda-nvrtc-cu12 / nvidia-cuda-nvcc-cu12 / nvidia-cuda-runtime-cu12 "
                    "not installed (or KCM_CU12_SITE unset)")  # fmt: skip
    nvrtc, ptxas, include = tools
    ptx = tmp_path / "k70.ptx"
    ptx.write_text(_nvrtc_ptx(nvrtc, include, "compute_70"))
    proc = _run([str(ptxas), "-arch=sm_70", "-O3", "-v", "-warn-spills", "-warn-lmem-usage",
                 str(ptx), "-o", str(tmp_path / "k70.cubin")])  # fmt: skip
    report = _ptxas_report(proc.stderr)
    assert {arch for _, arch in report} == {"sm_70"}
    assert len(report) == 9, sorted(report)  # 3 row norms, 3 RBF tiles, 3 convex kernels
    for (kernel, _), usage in report.items():
        assert usage["stack"] == 0 and usage["spill_stores"] == 0, (kernel, usage)
        if any(name in kernel for name in GEMM_KERNELS):
            assert usage["registers"] <= MAX_GEMM_REGISTERS, (kernel, usage)
    for name in GEMM_KERNELS:
        assert re.search(rf"\.entry\s+\w*{name}\w*\([^)]*\)\s*\.maxntid 256, 1, 1\s*"
                         rf"\.minnctapersm 2", ptx.read_text()), name  # fmt: skip
