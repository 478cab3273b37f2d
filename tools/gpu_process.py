"""Running one gpu-check stage: its commands in a process group of their own, with its
environment, output copied to the terminal and the log, killed at its time limit."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_stage(stage, log, timeout: float) -> tuple[str, float, str]:
    env = dict(os.environ)
    for key, value in stage.env.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    start = time.monotonic()
    for cmd in stage.commands:
        exe = shutil.which(cmd[0]) if not os.path.isabs(cmd[0]) else cmd[0]
        if exe is None:
            return "FAIL", time.monotonic() - start, f"{cmd[0]} not found on PATH"
        left = timeout - (time.monotonic() - start)
        banner = f"\n=== [{stage.name}] $ {shlex.join(cmd)}\n"
        print(banner, end="", flush=True)
        log.write(banner)
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,
        )  # fmt: skip

        def copy(stream=proc.stdout) -> None:
            for line in stream:
                sys.stdout.write(line)
                log.write(line)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(left, 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reader.join(timeout=10)
            return "FAIL", time.monotonic() - start, f"timed out after {timeout:.0f} s"
        reader.join(timeout=30)
        if rc != 0:
            return "FAIL", time.monotonic() - start, f"exit status {rc}: {' '.join(cmd[:4])}"
    return "PASS", time.monotonic() - start, ""
