"""`gpu_check.py`'s Markdown: a summary table of the parts, then each part's own tables.

Torch-free (it must write the report whatever failed to install), so it has its own small table
writer rather than `benchmarks.common.markdown_table`, which imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table; a `|` inside a cell is escaped."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    cells = (" | ".join(str(cell).replace("|", "\\|") for cell in row) for row in rows)
    return "\n".join(lines + [f"| {row} |" for row in cells])


def number(value, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def ratio(row: dict, numerator: str, denominator: str) -> str:
    return f"{row[numerator] / row[denominator]:.2f}x" if numerator in row and denominator in row else "n/a"


def environment(part: dict) -> list[str]:
    torch = part.get("torch", {})
    lines = [f"Driver: {part.get('driver')}. torch: {torch}.", ""]
    lines.append(
        "Packages: " + ", ".join(f"{k} {v or 'absent'}" for k, v in part.get("packages", {}).items())
    )
    actions = part.get("actions", [])
    if actions:
        rows = [[a["what"], a["why"], f"`{a['command']}`", a["result"]] for a in actions]
        lines += ["", table(["install", "why", "command", "result"], rows)]
    return lines


def correctness(part: dict) -> list[str]:
    rows = []
    for row in part.get("checks", []):
        if "skipped" in row:
            rows.append(
                [row.get("model", "all"), row["variant"], "", "", "", "", f"skipped: {row['skipped']}"]
            )
            continue
        result = "pass" if row["passed"] else "FAIL"
        if row.get("tokens_are_argmaxes") is False:
            result += " (tokens differ from the recomputed argmaxes)"
        error, tolerance = f"{row['error']:.1e}", f"{row['tolerance']:.0e}"
        rows.append([row["model"], row["variant"], row["check"], row["against"], error, tolerance, result])
    headers = ["model", "variant", "check", "against", "max error / max logit", "tolerance", "result"]
    return [table(headers, rows)]


def geometry(part: dict) -> list[str]:
    lines = [f"Model: {part.get('model')}.", ""]
    headers = [
        "frames",
        "design",
        "sequence",
        "slow tokens",
        "GFLOPs",
        "latency (ms)",
        "TFLOP/s",
        "peak memory (MiB)",
    ]
    rows = [
        [r["frames"], r["design"], f"{r['sequence']:,}", f"{r['slow_tokens']:,}", number(r["gflops"]),
         number(r["ms"]), f"{r['tflops_per_s']:.3g}", number(r["peak_mib"])]
        for r in part.get("prefill", [])
    ]  # fmt: skip
    lines += [table(headers, rows)]
    headline = part.get("headline")
    if headline:
        memory = "n/a" if headline["memory_ratio"] is None else f"{headline['memory_ratio']:.2f}x"
        lines += ["", "Slow-fast at 128 frames against self-attention at 16: "
                  f"{headline['gflops_ratio']:.3f}x the FLOPs, {headline['latency_ratio']:.2f}x the latency, "
                  f"{memory} the peak memory."]  # fmt: skip
    rows = []
    for r in part.get("decoding", []):
        ms = [number(r.get(v), 2) for v in ("cached", "re-projected", "text-only")]
        rows.append(
            [
                r["frames"],
                r["batch"],
                *ms,
                ratio(r, "cached", "text-only"),
                ratio(r, "re-projected", "cached"),
            ]
        )
    headers = ["frames", "batch", "cached (ms/token)", "re-projected (ms/token)", "text-only (ms/token)"]
    lines += ["", table(headers + ["cached / text-only", "re-projected / cached"], rows)]
    encoder = part.get("encoder")
    if encoder:
        lines += ["", f"Vision encoder: {number(encoder['ms_per_frame'], 2)} ms per frame on a chunk of "
                  f"{encoder['frames']} frames, peak memory {number(encoder['peak_mib'])} MiB."]  # fmt: skip
    return lines


def engines(part: dict) -> list[str]:
    rows = []
    for check in part.get("checks", []):
        if "skipped" in check:
            rows.append([check["check"], f"skipped: {check['skipped']}", ""])
        else:
            details = ", ".join(f"{k} {v}" for k, v in check.items() if k not in ("check", "passed"))
            rows.append([check["check"], "pass" if check["passed"] else "FAIL", details])
    return [table(["check", "result", "details"], rows)]


def claim(part: dict) -> list[str]:
    results = part.get("results", {})
    if not results:
        return []
    keys = sorted({key for result in results.values() for key in result})
    return [
        table(
            ["model", *keys], [[model, *(result.get(k) for k in keys)] for model, result in results.items()]
        )
    ]


SECTIONS = {
    "environment": environment,
    "correctness": correctness,
    "geometry": geometry,
    "engines": engines,
    "claim": claim,
}


def markdown(report: dict) -> str:
    load = ", ".join(str(x) for x in report["load_average"])
    lines = [
        f"GPU check{' (dry-run)' if report['dry_run'] else ''}: `{report['command']}`, {report['started']}; "
        f"{report['host']}; budget {report['budget_s']:g} s, took {report['elapsed_s']} s; load average {load}",
        "",
    ]
    rows = [
        [
            p["name"],
            report["estimates_s"].get(p["name"], ""),
            p.get("seconds", ""),
            p["status"],
            p.get("reason") or "",
        ]
        for p in report["parts"]
    ]
    lines.append(table(["part", "estimate (s)", "took (s)", "status", "reason"], rows))
    for part in report["parts"]:
        body = SECTIONS[part["name"]](part)
        if body:
            lines += ["", f"### {part['name']}", "", *body]
    return "\n".join(lines) + "\n"
