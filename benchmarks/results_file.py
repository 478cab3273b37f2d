"""The benchmark suite's result file: its schema, what identifies the machine (device, slug,
versions, git state), JSON-safe values and the record layout. Read back by report.py."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.timing import summarize

SCHEMA = "kcm-bench/1"
REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# Environment description
# ---------------------------------------------------------------------------------------------
def slugify(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "unknown"


def cpu_model_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if lines else None


def device_info(device: torch.device) -> dict[str, Any]:
    """Name, slug (the results sub-folder), and what else identifies the machine."""
    info: dict[str, Any] = {
        "type": device.type,
        "cpu_model": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            name=props.name,
            slug=slugify(props.name),
            capability=f"{props.major}.{props.minor}",
            total_memory_bytes=int(props.total_memory),
            multiprocessors=int(props.multi_processor_count),
            driver=_nvidia_driver(),
        )
    else:
        name = info["cpu_model"]
        info.update(name=name, slug="cpu-" + slugify(name), driver=None)
    return info


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of what was measured (triton read from its metadata: no import needed)."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None if cudnn is None else str(cudnn),
        "triton": _package_version("triton"),
        "numpy": _package_version("numpy"),
        "scikit-learn": _package_version("scikit-learn"),
        "transformers": _package_version("transformers"),
        "pykeops": _package_version("pykeops"),
        "pytest-benchmark": _package_version("pytest-benchmark"),
        "onnxruntime": _package_version("onnxruntime"),
        "kcm_cuda": _package_version("kcm_cuda") or _kcm_version(),
    }


def study_meta(**extra: Any) -> dict[str, Any]:
    """The header of a study script's results.json (onnx_speed, decoder_speed, encoder_speed,
    load_memory): the CPU it ran on and its torch threads (:func:`device_info`), the date, the
    versions (:func:`versions`), and the study's own settings (``extra``)."""
    machine = device_info(torch.device("cpu"))
    return {
        "device": f"{machine['name']} ({machine['torch_threads']} torch threads)",
        "machine": machine,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        **extra,
    }


def write_study(out: Path, meta: dict[str, Any], rows: list, lines: list[str]) -> None:
    """A study's results.json ({"meta", "rows"}) and report.md (``lines``), printed too."""
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1, default=str)
    )
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    print(text, end="")


def _kcm_version() -> str | None:
    """kcm_cuda's version when it runs from the source tree (not pip-installed)."""
    try:
        import kcm_cuda
    except ImportError:
        return None
    return getattr(kcm_cuda, "__version__", None)


def git_info(root: Path = REPO_ROOT) -> dict[str, Any]:
    """sha (None before the first commit or outside git), branch, and dirty: whether tracked
    files differ from that commit (untracked files are not counted)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *args],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "--verify", "--quiet", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "sha": sha or None,
        "branch": git("rev-parse", "--abbrev-ref", "HEAD") if sha else None,
        "dirty": None if status is None else bool(status),
    }


def _json_safe(value: Any, depth: int = 0) -> Any:
    """A JSON-serialisable copy (tensors → lists/scalars when small, else a shape note)."""
    if depth > 6:
        return repr(value)[:200]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        if value.numel() <= 64:
            return _json_safe(value.detach().cpu().tolist(), depth + 1)
        return f"<tensor {tuple(value.shape)} {value.dtype}>"
    if isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) > 256:
            return f"<{type(value).__name__} of {len(value)}>"
        return [_json_safe(v, depth + 1) for v in value]
    if hasattr(value, "item") and callable(value.item):
        with contextlib.suppress(Exception):
            return _json_safe(value.item(), depth + 1)
    return repr(value)[:200]


json_safe = _json_safe


def blank_record(**fields: Any) -> dict[str, Any]:
    """A record with every field present (None / empty), updated with ``fields``."""
    record: dict[str, Any] = {
        "op": None, "case": None, "peer": None, "ours": False, "same_op": True,
        "status": "ok", "reason": None, "params": {}, "dtype": "float32",
        "precision": "ieee", "peer_precision": None, "rounds": 0, "samples_ms": [],
        **summarize([]), "cpu_samples_ms": [], "cpu_median_ms": None,
        "flops": None, "tflops": None, "peak_tflops": None, "pct_peak": None,
        "peak_mem_bytes": None, "mem_kind": None, "primary": False, "baseline": None,
        "note": None, "info": {}, "speedup_vs_baseline": None,
    }
    record.update(fields)
    if record["samples_ms"]:
        record.update(summarize(record["samples_ms"]))
        record["rounds"] = len(record["samples_ms"])
    return record
