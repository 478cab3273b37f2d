"""The console scripts' entry points (``kcm-prune``, ``kcm-eval``): signals first, imports
after, so that Ctrl-C or a SIGTERM at any moment of a run — while torch and transformers are
being imported, during a save — ends it with one line and no traceback. A SIGTERM raises
:class:`Terminated` (a KeyboardInterrupt) in the main thread, so every ``finally`` and
cleanup runs as for Ctrl-C: a save's temporary directory is removed and its lock released.
Exit status 130 after SIGINT, 143 after SIGTERM (the shells' 128 + signal number)."""

from __future__ import annotations

import importlib
import signal
import sys


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM."""


def _on_sigterm(_signum, _frame):
    raise Terminated()


def interrupted(prog: str, exc: BaseException) -> int:
    """Print the one line for an interrupted run; its exit status."""
    if isinstance(exc, Terminated):
        print(f"{prog}: terminated", file=sys.stderr)
        return 143
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130


def run(module: str, prog: str, argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main = importlib.import_module(module).main
        return main(argv)
    except KeyboardInterrupt as exc:
        return interrupted(prog, exc)


def kcm_prune() -> None:
    sys.exit(run("kcm_cuda.cli", "kcm-prune"))


def kcm_eval() -> None:
    sys.exit(run("kcm_cuda.evaluation.cli", "kcm-eval"))
