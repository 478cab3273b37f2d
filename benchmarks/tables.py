"""Plain-text tables of benchmark records (the terminal summary and benchmarks/report.py)."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, spec: str, empty: str = "-") -> str:
    if value is None:
        return empty
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def _mb(value: Any) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _rows_to_text(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    for row in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return out


def format_table(records: list[dict[str, Any]]) -> str:
    """One block per (op, case), one line per peer: median ms (IQR), TFLOP/s, % of the
    device's peak for the precision used, extra memory, speed-up against the case's baseline."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((str(r.get("op")), str(r.get("case"))), []).append(r)
    lines: list[str] = []
    with_cpu = any(r.get("cpu_median_ms") is not None for r in records)
    header = ["peer", "median ms", "IQR ms", "rounds", "TFLOP/s", "% peak", "mem MB", "x base",
              "note"]
    if with_cpu:
        header.insert(3, "cpu ms")
    for (op, case), group in groups.items():
        base = next((r.get("baseline") for r in group if r.get("baseline")), None)
        lines.append(f"== {op}  {case}" + (f"   (x base: speed-up vs {base})" if base else ""))
        rows = []
        for r in group:
            status = r.get("status", "ok")
            name = r["peer"] + ("*" if r.get("ours") else "")
            if status != "ok":
                row = [name, status] + [""] * (len(header) - 3) + [str(r.get("reason") or "")[:90]]
                rows.append(row)
                continue
            note = r.get("note") or ""
            info = r.get("info") or {}
            if "n_iter" in info:
                note = (f"iters {info['n_iter']} " + note).strip()
            row = [
                name,
                _fmt(r.get("median_ms"), ".3f"),
                _fmt(r.get("iqr_ms"), ".3f"),
                str(r.get("rounds", "")),
                _fmt(r.get("tflops"), ".4g"),
                _fmt(r.get("pct_peak"), ".1f"),
                _mb(r.get("peak_mem_bytes")),
                _fmt(r.get("speedup_vs_baseline"), ".2f"),
                note[:90],
            ]
            if with_cpu:
                row.insert(3, _fmt(r.get("cpu_median_ms"), ".3f"))
            rows.append(row)
        lines.extend("   " + line for line in _rows_to_text(header, rows))
    lines.append(
        "(* = kcm_cuda; IQR = inter-quartile range of the rounds"
        + ("; cpu ms = median process CPU time" if with_cpu else "") + ")"
    )
    return "\n".join(lines)
