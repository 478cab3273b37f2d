"""pytest setup of the benchmark suite: options, profile, the session recorder, the result file.

    python -m pytest benchmarks                        full sizes (GPU if present; on a CPU the
                                                       sizes that fit, see README.md)
    KCM_BENCH_SMOKE=1 python -m pytest benchmarks      smoke: tiny sizes, CPU only, 2 rounds
    python -m pytest benchmarks --smoke                the same

The bench files are named bench_*.py; they are collected by the hook below (pytest's default
pattern is test_*.py, which only the suite's own unit tests use).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks import harness, results_file  # noqa: E402 (after the environment is set)

_SMOKE_ENV = "KCM_BENCH_SMOKE"


def _env_smoke() -> bool:
    return os.environ.get(_SMOKE_ENV, "0").strip().lower() not in ("", "0", "false", "no")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kcm-bench", "kcm_cuda benchmark suite")
    group.addoption(
        "--smoke", action="store_true", default=False,
        help="tiny sizes, CPU backends only, 2 rounds (also: env KCM_BENCH_SMOKE=1)",
    )
    group.addoption(
        "--kcm-device", choices=("cpu", "cuda"), default=None,
        help="device of a full run (default: cuda when available)",
    )
    group.addoption(
        "--kcm-cpu-all", action="store_true", default=False,
        help="on a CPU, run the full GPU sizes too (11008, batch 128, 2048 sequences: slow)",
    )
    group.addoption("--kcm-rounds", type=int, default=None, help="fixed rounds per case")
    group.addoption(
        "--kcm-threads", type=int, default=None,
        help="CPU threads for torch and the BLAS of numpy/scikit-learn (default: as is). On a "
        "shared machine 1 avoids OpenMP barriers stalling on a descheduled thread",
    )
    group.addoption(
        "--kcm-no-compile", action="store_true", default=False,
        help="skip the torch.compile peers",
    )
    group.addoption(
        "--kcm-pruned-by", choices=("auto", "kcm", "uniform"), default="auto",
        help="inference: pruned models from kcm_cuda.prune ('kcm'), from a uniform per-layer "
        "keep at the same FLOPs ('uniform'); auto: kcm on a GPU, uniform on a CPU",
    )
    group.addoption(
        "--kcm-out", default=None,
        help="result file or folder (default: benchmarks/results/<device-slug>/ for a full "
        "run, the system temp folder for a smoke run)",
    )
    group.addoption(
        "--kcm-no-save", action="store_true", default=False, help="write no result file"
    )


def pytest_configure(config: pytest.Config) -> None:
    # With --benchmark-disable the suite times the peers itself: pytest-benchmark's fixture
    # then stays unused, which is expected here.
    config.addinivalue_line(
        "filterwarnings", "ignore:Benchmark fixture was not used at all:Warning"
    )
    smoke = bool(config.getoption("--smoke", default=False)) or _env_smoke()
    if smoke:
        os.environ[_SMOKE_ENV] = "1"
    profile = harness.make_profile(
        smoke=smoke,
        device=config.getoption("--kcm-device", default=None),
        cpu_all=bool(config.getoption("--kcm-cpu-all", default=False)),
        rounds=config.getoption("--kcm-rounds", default=None),
        compile=not config.getoption("--kcm-no-compile", default=False),
        pruned_by=config.getoption("--kcm-pruned-by", default="auto"),
    )
    threads = config.getoption("--kcm-threads", default=None)
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError("--kcm-threads must be >= 1")
        import torch

        torch.set_num_threads(threads)
        try:
            from threadpoolctl import threadpool_limits

            # Kept alive on the config: the limits hold for the whole session.
            config._kcm_threadpool = threadpool_limits(limits=threads)  # type: ignore[attr-defined]
        except ImportError:
            pass
    config._kcm_profile = profile  # type: ignore[attr-defined]
    config._kcm_recorder = harness.Recorder(profile)  # type: ignore[attr-defined]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """Collect benchmarks/bench_*.py (unless given on the command line: pytest collects those)."""
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and file_path.parent == Path(__file__).parent
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A bench module's ``make_cases(profile)`` gives the ``case`` parameters of its tests."""
    if "case" in metafunc.fixturenames and hasattr(metafunc.module, "make_cases"):
        profile: harness.Profile = metafunc.config._kcm_profile  # type: ignore[attr-defined]
        cases = list(metafunc.module.make_cases(profile, metafunc.function.__name__))
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def profile(pytestconfig: pytest.Config) -> harness.Profile:
    return pytestconfig._kcm_profile  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def recorder(pytestconfig: pytest.Config) -> harness.Recorder:
    return pytestconfig._kcm_recorder  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def device(profile: harness.Profile):
    import torch

    if profile.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--kcm-device cuda but CUDA is not available")
    return profile.torch_device


@pytest.fixture
def bench(request: pytest.FixtureRequest, recorder: harness.Recorder) -> Any:
    """``bench(op=..., case=..., peers=[...], ...)``: measure one case and record it.

    Drives pytest-benchmark's fixture with the primary peer when pytest-benchmark is installed
    and enabled (so ``--benchmark-json``/``--benchmark-compare`` also work); the suite's own
    result file holds every peer."""
    try:
        benchmark = request.getfixturevalue("benchmark")
    except pytest.FixtureLookupError:
        benchmark = None

    def run(**kwargs: Any) -> list[dict[str, Any]]:
        return recorder.run_case(benchmark=benchmark, **kwargs)

    return run


def smoke_output_dir(slug: str) -> Path:
    """Where a smoke run writes: the repository's out/ folder (ignored by git), never the
    system temp directory or another fixed folder outside the repo."""
    return results_file.REPO_ROOT / "out" / "bench-smoke" / slug


def _output_path(config: pytest.Config, recorder: harness.Recorder) -> Path | None:
    if config.getoption("--kcm-no-save", default=False) or not recorder.records:
        return None
    out = config.getoption("--kcm-out", default=None)
    if out:
        return Path(out)
    if recorder.profile.smoke:
        return smoke_output_dir(recorder.device_info["slug"])
    return None  # the default: benchmarks/results/<slug>/<stamp>-<sha>-<profile>.json


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    recorder: harness.Recorder | None = getattr(config, "_kcm_recorder", None)
    if recorder is None or not recorder.records:
        return
    terminalreporter.section("kcm_cuda benchmarks")
    terminalreporter.write_line(harness.records_table(recorder.records))
    goals = harness.goals_lines(recorder.records)
    if goals:
        terminalreporter.section("GPU goals (reported, not asserted)")
        for line in goals:
            terminalreporter.write_line(line)
    if config.getoption("--kcm-no-save", default=False):
        return
    path = recorder.write(_output_path(config, recorder))
    terminalreporter.write_line(f"results: {path}")
    terminalreporter.write_line(f"table / compare: python -m benchmarks.report {path} [NEWER.json]")
