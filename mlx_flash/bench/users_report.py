"""The users' regime report: results.json, results.md (the grid and the perplexities) and
tps_vs_cap.png (decode tok/s against the cap as a fraction of the GGUF's size)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..format.storage import write_text_atomic
from .caps import MIB, cap_label
from .report import fmt, pyplot, save_figure

GRID_COLUMNS = ("cap", "contender", "outcome", "tokens", "tok/s", "ms/tok", "disk MiB/tok",
                "flash read MiB/tok", "cgroup peak MiB", "peak RSS MiB", "load s", "ttft s",
                "message")
PPL_COLUMNS = ("contender", "perplexity", "tokens", "outcome", "message")

NOTES = """
Columns. tokens: decoded (fewer than asked when the cell reached its time limit).
tok/s, ms/tok: greedy decode over tokens 2..N (the first carries the prompt).
disk MiB/tok: /proc/self/io read_bytes per token (what reached the block device: page faults of
mmap'd files, buffered and O_DIRECT reads; page-cache hits excluded). flash read MiB/tok: bytes
mlx-flash read into its neuron caches. cgroup peak: memory.max_usage_in_bytes of the run's
group (page cache included). load s: the model's load; ttft s: the time to the first token
(the prompt's prefill; mlx-flash fills its neuron caches from flash during it). outcome: ok,
refused (the loader declined the budget: message), oom (killed under the cap), skipped (message
says why), timeout, error or crashed (see the log).
"""


def outcome(row: dict) -> str:
    """The row's status, with "(OOM)" when the cgroup saw an OOM kill of a run that finished."""
    status = row["status"]
    return status + (" (OOM)" if row.get("oom_killed") and status != "oom" else "")


def message(row: dict, width: int = 120) -> str:
    """The first line of the row's error, cut to `width` characters, pipes escaped."""
    text = (row.get("error") or "").strip().splitlines()
    line = text[0] if text else ""
    return (line[:width - 3] + "..." if len(line) > width else line).replace("|", "\\|")


def grid_row(r: dict, size: int) -> list[str]:
    """One cell's line, in GRID_COLUMNS order."""
    cg = r.get("cgroup") or {}
    made = r.get("tokens_out")
    return [cap_label(r["cap_bytes"], size), r["name"], outcome(r),
            "-" if made is None else str(len(made)), fmt(r.get("decode_tps"), digits=2), fmt(r.get("ms_per_token"), digits=0),
            fmt(r.get("disk_bytes_per_token"), MIB), fmt(r.get("bytes_read_per_token"), MIB),
            fmt(cg.get("max_usage_bytes"), MIB, 0), fmt(r.get("peak_rss_bytes"), MIB, 0),
            fmt(r.get("load_s"), digits=1), fmt(r.get("ttft_s"), digits=2), message(r)]


def ppl_row(r: dict) -> list[str]:
    """One contender's perplexity line, in PPL_COLUMNS order."""
    return [r["name"], fmt(r.get("ppl"), digits=3), str(r.get("ppl_tokens", "-")), outcome(r),
            message(r)]


def table(columns: tuple[str, ...], lines: list[list[str]]) -> str:
    """A GitHub markdown table."""
    out = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines])


def markdown(report: dict) -> str:
    """results.md of the users' regime."""
    size = report["gguf_bytes"]
    caps = ", ".join(cap_label(c, size) for c in report["caps"])
    enforced = "cgroup v1 memory.limit_in_bytes, page cache included" if report["cgroup"] else \
        "NOT enforced: no cgroup (flash read with O_DIRECT)"
    labels = {r["name"]: r["label"] for r in report["runs"]}
    limit = (f"; a cell stops decoding {report['cell_seconds']:.0f} s after its first token"
             if report.get("cell_seconds") else "")
    parts = [f"# mlx-flash benchmark, users' regime: {report['model_name']}\n",
             f"Command: `{report['command']}`\n", f"Code: {report['code']}\n",
             f"Machine: {report['machine']}\n",
             f"Model: {report['model']} (GGUF {report['gguf']}, {size / MIB:.0f} MiB); prompt "
             f"{len(report['prompt_ids'])} tokens, {report['tokens']} generated (greedy, no EOS "
             f"stop{limit}); caps as fractions of the GGUF's size: {caps} ({enforced}).\n",
             table(GRID_COLUMNS, [grid_row(r, size) for r in report["runs"]]), NOTES,
             "\n".join(f"- `{name}`: {label}" for name, label in labels.items())]
    if report.get("perplexity"):
        parts += [f"\n## Perplexity ({report['ppl_text_tokens']} tokens of the fixed text in "
                  "mlx_flash/bench/perplexity.py, no cap, each contender once)\n",
                  table(PPL_COLUMNS, [ppl_row(r) for r in report["perplexity"]])]
    return "\n".join(parts) + "\n"


def plot_tps_vs_cap(report: dict, path: Path, plt) -> Path:
    """tok/s against cap / GGUF size, a line per contender; "no cap" right of the largest cap;
    cells without a speed (refused, OOM, skipped) as crosses on the lower edge."""
    runs = [r for r in report["runs"] if r.get("task", "generate") == "generate"]
    fractions = [c / report["gguf_bytes"] for c in report["caps"] if c is not None]
    none_x = (max(fractions) if fractions else 1.0) + 0.3

    def x_of(r: dict) -> float:
        return none_x if r["cap_bytes"] is None else r["cap_bytes"] / report["gguf_bytes"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    speeds = [r["decode_tps"] for r in runs if r.get("decode_tps")]
    floor = min(speeds) / 2 if speeds else 0.1
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        pts = sorted((x_of(r), r["decode_tps"]) for r in mine if r.get("decode_tps"))
        line = ax.plot(*zip(*pts, strict=True), marker="o", label=name) if pts else \
            ax.plot([], [], marker="o", label=name)
        failed = [x_of(r) for r in mine if not r.get("decode_tps")]
        if failed:
            ax.plot(failed, [floor] * len(failed), "x", color=line[0].get_color(), ms=9)
    ticks = sorted(set(fractions))
    ax.set_xticks([*ticks, none_x], [f"{t:.2f}" for t in ticks] + ["no cap"])
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("DRAM cap / GGUF size (x: no speed: refused, OOM or skipped)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{report['model_name']}: users' regime, {report['tokens']} greedy tokens")
    ax.legend(fontsize=8)
    return save_figure(fig, path, plt)


def write_users_report(report: dict, out: Path) -> None:
    """results.json, tps_vs_cap.png (with matplotlib) and results.md under `out`; the markdown
    also on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    report["plots"] = [str(plot_tps_vs_cap(report, out / "tps_vs_cap.png", plt))] if plt else []
    write_text_atomic(out / "results.json", json.dumps(report, indent=1, default=str))
    text = markdown(report)
    write_text_atomic(out / "results.md", text)
    print(text)
    print(f"[bench] wrote {out / 'results.json'}, {out / 'results.md'} and "
          f"{len(report['plots'])} plot(s)", file=sys.stderr)
