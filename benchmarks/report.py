"""Print a benchmark result file as a table, or compare two of them.

    python -m benchmarks.report RESULT                 table of one run (a file, or a folder:
                                                       its newest result)
    python -m benchmarks.report OLD NEW                ratio NEW/OLD per case and peer; cases
                                                       more than 10% slower are REGRESSIONs
    python -m benchmarks.report DIR --previous         the newest run of DIR against the one
                                                       before it

Options: --threshold 0.10, --op OP (only that op), --ours (only kcm_cuda's own peers),
--metric cpu (CPU runs: compare process CPU time, robust to a busy shared machine),
--force (compare runs from different devices anyway: a warning instead of a refusal).
Exit status of a comparison: 0 no regression, 1 regressions found, 2 refused (different
devices or profiles, or unreadable files).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.results_file import SCHEMA
from benchmarks.tables import _fmt, _rows_to_text, format_table

EXIT_OK, EXIT_REGRESSION, EXIT_REFUSED = 0, 1, 2


def resolve_result(path: str | Path, previous: bool = False) -> Path:
    """A result file; a folder gives its newest result (or the one before with previous)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.json"), key=lambda f: (f.name, f.stat().st_mtime))
        if len(files) < (2 if previous else 1):
            raise ValueError(f"{p}: needs {'two' if previous else 'a'} result file(s) (*.json)")
        return files[-2] if previous else files[-1]
    if not p.is_file():
        raise ValueError(f"{p}: no such result file or folder")
    return p


def load(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p}: not a readable JSON result file ({exc})") from exc
    if not isinstance(data, dict) or "records" not in data or "meta" not in data:
        raise ValueError(f"{p}: not a kcm_cuda benchmark result (no meta/records)")
    schema = data["meta"].get("schema")
    if schema != SCHEMA:
        print(f"warning: {p} has schema {schema!r}, this tool reads {SCHEMA!r}", file=sys.stderr)
    return data


def _key(r: dict[str, Any]) -> tuple[str, str, str]:
    return (str(r.get("op")), str(r.get("case")), str(r.get("peer")))


def _select(records: list[dict[str, Any]], op: str | None, ours: bool) -> list[dict[str, Any]]:
    return [
        r for r in records if (op is None or r.get("op") == op) and (not ours or r.get("ours"))
    ]


def describe(meta: dict[str, Any]) -> str:
    dev = meta.get("device", {})
    ver = meta.get("versions", {})
    git = meta.get("git", {})
    parts = [
        f"device: {dev.get('name')} [{dev.get('slug')}]",
        f"driver {dev.get('driver')}" if dev.get("driver") else None,
        f"torch {ver.get('torch')}",
        f"cuda {ver.get('cuda')}" if ver.get("cuda") else None,
        f"triton {ver.get('triton')}" if ver.get("triton") else None,
        f"git {(git.get('sha') or 'none')[:10]}{'+dirty' if git.get('dirty') else ''}",
        f"profile {meta.get('profile')}{' (reduced)' if meta.get('reduced') else ''}",
        f"date {meta.get('date')}",
    ]
    return " | ".join(p for p in parts if p)


def _stat(r: dict[str, Any], metric: str) -> tuple[float | None, float]:
    """(median, IQR) of a record: wall time, or (metric "cpu") the process CPU time."""
    if metric == "wall":
        return r.get("median_ms"), r.get("iqr_ms") or 0.0
    samples = sorted(r.get("cpu_samples_ms") or [])
    if not samples:
        return None, 0.0
    iqr = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else [0, 0, 0]
    return statistics.median(samples), iqr[2] - iqr[0]


def compare(
    old: dict[str, Any], new: dict[str, Any], threshold: float = 0.10, force: bool = False,
    op: str | None = None, ours: bool = False, metric: str = "wall",
) -> tuple[int, str]:
    """(exit status, text). A case is a REGRESSION when NEW's median is more than
    ``threshold`` slower than OLD's on the same device; 'noisy' when either run's IQR exceeds
    ``threshold`` of its median (read those ratios with care). metric "cpu" compares the
    process CPU time of CPU runs (robust to a busy shared machine) instead of wall time."""
    lines = [f"old: {describe(old['meta'])}", f"new: {describe(new['meta'])}"]
    old_dev = old["meta"].get("device", {}).get("slug")
    new_dev = new["meta"].get("device", {}).get("slug")
    if old_dev != new_dev:
        msg = f"different devices: {old_dev!r} vs {new_dev!r}; timings are not comparable"
        if not force:
            lines.append(f"REFUSED: {msg} (use --force to print the ratios anyway)")
            return EXIT_REFUSED, "\n".join(lines)
        lines.append(f"WARNING: {msg}; no regression is flagged")
    if old["meta"].get("profile") != new["meta"].get("profile"):
        lines.append(
            f"WARNING: different profiles ({old['meta'].get('profile')} vs "
            f"{new['meta'].get('profile')}): only cases present in both are compared"
        )
    old_map = {_key(r): r for r in _select(old["records"], op, ours)}
    rows: list[list[str]] = []
    regressions = improvements = 0
    missing_new = []
    for r in _select(new["records"], op, ours):
        o = old_map.pop(_key(r), None)
        if o is None:
            continue
        (om, o_iqr), (nm, n_iqr) = _stat(o, metric), _stat(r, metric)
        if not om or not nm:
            rows.append([r["op"], r["case"], r["peer"], _fmt(om, ".3f"), _fmt(nm, ".3f"), "-",
                         f"{o.get('status')}->{r.get('status')}"])
            continue
        ratio = nm / om
        noisy = o_iqr > threshold * om or n_iqr > threshold * nm
        flag = ""
        if old_dev == new_dev and ratio > 1.0 + threshold:
            flag = "REGRESSION"
            regressions += 1
        elif ratio < 1.0 / (1.0 + threshold):
            flag = "faster"
            improvements += 1
        if noisy and flag:
            flag += " (noisy)"
        rows.append([r["op"], r["case"], r["peer"], f"{om:.3f}", f"{nm:.3f}", f"{ratio:.3f}",
                     flag])
    missing_new = sorted("/".join(k) for k in old_map)
    unit = "ms" if metric == "wall" else "cpu ms"
    header = ["op", "case", "peer", f"old {unit}", f"new {unit}", "new/old", "flag"]
    lines.extend(_rows_to_text(header, rows))
    if missing_new:
        lines.append(f"{len(missing_new)} case(s) of OLD not in NEW: " + ", ".join(missing_new[:8])
                     + (" ..." if len(missing_new) > 8 else ""))
    lines.append(
        f"{len(rows)} compared, {regressions} regression(s) > {threshold:.0%}, "
        f"{improvements} faster"
    )
    return (EXIT_REGRESSION if regressions else EXIT_OK), "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("results", nargs="+", help="one result (table) or two (OLD NEW)")
    parser.add_argument("--previous", action="store_true",
                        help="with one folder: compare its newest result against the one before")
    parser.add_argument("--threshold", type=float, default=0.10,
                        help="relative slow-down flagged as a regression (default 0.10)")
    parser.add_argument("--force", action="store_true",
                        help="compare results of different devices (warning, no flags)")
    parser.add_argument("--op", default=None, help="only this op (rbf, convex_update, ...)")
    parser.add_argument("--ours", action="store_true", help="only kcm_cuda's own peers")
    parser.add_argument("--metric", choices=("wall", "cpu"), default="wall",
                        help="compare wall time (default) or, for CPU runs, process CPU time")
    args = parser.parse_args(argv)
    if len(args.results) > 2:
        parser.error("give one result (table) or two (OLD NEW)")
    if not 0 < args.threshold < 10:
        parser.error("--threshold must be in (0, 10)")
    try:
        if len(args.results) == 1 and not args.previous:
            data = load(resolve_result(args.results[0]))
            print(describe(data["meta"]))
            print(format_table(_select(data["records"], args.op, args.ours)))
            return EXIT_OK
        if len(args.results) == 1:
            old_path = resolve_result(args.results[0], previous=True)
            new_path = resolve_result(args.results[0])
        else:
            old_path, new_path = (resolve_result(p) for p in args.results)
        old, new = load(old_path), load(new_path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    status, text = compare(old, new, args.threshold, args.force, args.op, args.ours, args.metric)
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
