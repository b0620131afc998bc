"""The benchmark's report: derived numbers, results.json, the markdown table and PNG plots."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..format.home import kernel_dir
from .caps import MIB, cap_label

TIME_SPLIT = ("predictor", "io", "memory", "compute", "ffn_unsplit", "rest")
PACKAGE = Path(__file__).resolve().parents[1]  # the mlx_flash package the workers run


# ---------------------------------------------------------------- where and what ran


def command_line() -> str:
    """How this process was started, shell-quoted (`python -m mlx_flash.bench ...` for -m)."""
    head, *rest = sys.argv
    start = Path(head).resolve().parent
    if Path(head).name == "__main__.py" and start.is_relative_to(PACKAGE.parent):
        head = "python -m " + ".".join(start.relative_to(PACKAGE.parent).parts)
    else:
        head = shlex.quote(head)
    return " ".join([head, *(shlex.quote(a) for a in rest)])


def machine_description(model: Path) -> str:
    """OS, CPU, cores, RAM, the model's device and the load average, in one line."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               "?") if Path("/proc/cpuinfo").exists() else "?"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    dev = os.stat(model).st_dev
    load = os.getloadavg()[0]
    return (f"{os.uname().sysname} {os.uname().machine}, {cpu}, {os.cpu_count()} cores, "
            f"{mem / 2**30:.0f} GiB RAM, model on device {os.major(dev)}:{os.minor(dev)}, "
            f"load average {load:.1f} at start")


def kernel_sources() -> list[Path]:
    """The kernel source files the package builds from (none found: an empty list)."""
    try:
        root = kernel_dir("cpu_kernels.c")
    except FileNotFoundError:
        return []
    return sorted(p for p in root.iterdir() if p.is_file())


def source_stamp() -> dict:
    """Which mlx_flash code the workers run: git HEAD (if any) and a hash of its sources, the
    kernel sources included (the C kernels set most of a run's speed)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + path.read_bytes())
    for path in kernel_sources():
        digest.update(f"kernels/{path.name}".encode() + path.read_bytes())
    try:
        head = subprocess.run(["git", "-C", str(PACKAGE), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return {"package": str(PACKAGE), "git": head or None, "sources_sha256": digest.hexdigest()}


# ---------------------------------------------------------------- derived numbers


def time_split_ms(row: dict) -> dict | None:
    """ms/token by TIME_SPLIT key; what the FFN stats do not cover is `rest`."""
    total = row.get("ms_per_token")
    if total is None:
        return None
    split = dict.fromkeys(TIME_SPLIT, 0.0)
    if "flash_seconds_per_token" in row:
        for k, v in row["flash_seconds_per_token"].items():
            split[k] = 1e3 * v
    elif "ffn_unsplit_s_per_token" in row:
        split["ffn_unsplit"] = 1e3 * row["ffn_unsplit_s_per_token"]
    split["rest"] = max(0.0, total - sum(split.values()))
    return split


def derive(row: dict, seq_throughput: float | None) -> dict:
    """Add the split, achieved read throughput and the read-time/ideal ratio to a row."""
    split = time_split_ms(row)
    if split is None:
        return row
    row["split_ms"] = split
    read = row.get("bytes_read_per_token", 0.0) + row.get("predictor_bytes_per_token", 0.0)
    if "bytes_read_per_token" in row and split["io"] > 0:
        row["read_throughput"] = row["bytes_read_per_token"] / (split["io"] / 1e3)
        if seq_throughput:
            ideal_ms = 1e3 * row["bytes_read_per_token"] / seq_throughput
            row["io_vs_ideal"] = split["io"] / ideal_ms if ideal_ms else None
    row["all_flash_bytes_per_token"] = read
    return row


def agreement(rows: list[dict]) -> None:
    """Per row: how many leading tokens equal the dense reference's."""
    ref = next((r.get("tokens_out") for r in rows if r["name"] == "dense"
                and r.get("tokens_out")), None)
    for r in rows:
        out = r.get("tokens_out")
        if ref is None or not out:
            continue
        same = next((i for i, (a, b) in enumerate(zip(ref, out, strict=False)) if a != b),
                    min(len(ref), len(out)))
        r["same_tokens_as_dense"] = same


def speedups(rows: list[dict]) -> list[dict]:
    """mlx-flash decode tok/s over naive and mmap at each cap (the issue's targets)."""
    out = []
    for cap in sorted({r["cap_bytes"] for r in rows if r["cap_bytes"] is not None}):
        at = {r["name"]: r for r in rows if r["cap_bytes"] == cap}
        flash = at.get("flash", {}).get("decode_tps")
        entry = {"cap_bytes": cap}
        for other in ("naive", "mmap", "llama.cpp"):
            tps = at.get(other, {}).get("decode_tps")
            entry[f"vs_{other}"] = flash / tps if flash and tps else None
        entry["io_vs_ideal"] = at.get("flash", {}).get("io_vs_ideal")
        entry["flash_same_tokens"] = at.get("flash", {}).get("same_tokens_as_dense")
        out.append(entry)
    return out


# ---------------------------------------------------------------- markdown


def fmt(value, scale: float = 1.0, digits: int = 1) -> str:
    """value / scale with `digits` decimals, or "-" for None."""
    return "-" if value is None else f"{value / scale:.{digits}f}"


TABLE_COLUMNS = ("cap", "contender", "status", "tok/s", "ms/tok", "pred", "io", "mem", "comp",
                 "ffn(io+comp)", "rest", "MiB/tok cache", "reads/tok", "ampl",
                 "MiB/tok select", "disk MiB/tok",
                 "read MB/s",
                 "io/ideal", "cgroup peak MiB", "peak RSS MiB", "base RSS MiB", "hit",
                 "same tok")


COLUMN_NOTES = """
Columns. tok/s and ms/tok: decode, tokens 2..N (the first token carries the prompt).
pred/io/mem/comp: ms/token from mlx-flash's per-token stats (comp includes the attention that
each FlashFFN's input evaluation forces); ffn(io+comp): the mmap FFN, page faults inside;
rest: everything else (lm_head, sampling, Python; attention for mmap). MiB/tok cache: bytes
read into the neuron caches; reads/tok: their syscalls; ampl: read amplification (bytes read /
bytes of the neurons needed: O_DIRECT pages and gaps the read planner crossed); MiB/tok select: bytes the no-predictor oracle read to choose
neurons; disk MiB/tok: /proc/self/io read_bytes (what reached the block device, page-cache hits
excluded). read MB/s: cache bytes / io time; io/ideal: io time / (cache bytes / best sequential
throughput), target <= 1.3. cgroup peak: memory.max_usage_in_bytes (page cache included);
base RSS: Python + MLX (+ mlx_lm) imported, no weights. same tok: leading tokens equal to dense's.
"""


def table_row(r: dict, size: int) -> list[str]:
    """One run's cells, in TABLE_COLUMNS order."""
    split = r.get("split_ms") or {}
    cg = r.get("cgroup") or {}
    status = r["status"] + (" (OOM)" if r.get("oom_killed") and r["status"] != "oom" else "")
    return [cap_label(r["cap_bytes"], size) if r["name"] != "dense" else "none", r["name"],
            status, fmt(r.get("decode_tps"), digits=2), fmt(r.get("ms_per_token"), digits=0),
            *[fmt(split.get(k), digits=0) if split else "-" for k in TIME_SPLIT],
            fmt(r.get("bytes_read_per_token"), MIB), fmt(r.get("reads_per_token"), digits=0),
            fmt(r.get("read_amplification"), digits=2),
            fmt(r.get("predictor_bytes_per_token"), MIB),
            fmt(r.get("disk_bytes_per_token"), MIB),
            fmt(r.get("read_throughput"), 1e6, 0), fmt(r.get("io_vs_ideal"), digits=2),
            fmt(cg.get("max_usage_bytes"), MIB, 0), fmt(r.get("peak_rss_bytes"), MIB, 0),
            fmt(r.get("baseline_rss_bytes"), MIB, 0),
            "-" if r.get("hit_rate") is None else f"{r['hit_rate']:.0%}",
            str(r.get("same_tokens_as_dense", "-"))]


def markdown_table(rows: list[dict], size: int) -> str:
    """The results as a GitHub markdown table, one line per run."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(table_row(r, size)) + " |" for r in rows]
    return "\n".join(lines)


def notes(rows: list[dict]) -> list[str]:
    """One line per run that did not produce numbers, and every row's label."""
    out = []
    for r in rows:
        cap = "none" if r["cap_bytes"] is None else f"{r['cap_bytes'] / MIB:.0f} MiB"
        if r["status"] != "ok":
            out.append(f"- {r['name']} @ {cap}: {r['status']}: "
                       f"{(r.get('error') or '').splitlines()[0] if r.get('error') else ''}")
    seen = {}
    for r in rows:
        seen.setdefault(r["name"], f"- `{r['name']}`: {r['label']}; {r['io_mode']}")
    return out + list(seen.values())


def disk_table(disk: dict) -> str:
    """Random direct-read throughput by read size and threads, after the sequential line."""
    rand = disk["random"]
    threads = list(rand)
    lines = ["| read size | " + " | ".join(f"{t} thr MB/s" for t in threads) + " |",
             "|---|" + "---|" * len(threads)]
    for k in rand[threads[0]]:
        lines.append(f"| {k} KiB | " + " | ".join(f"{rand[t][k] / 1e6:.0f}" for t in threads)
                     + " |")
    seq = ", ".join(f"{t} thread(s) {v / 1e6:.0f} MB/s" for t, v in
                    disk["sequential_1mib"].items())
    return f"Sequential 1 MiB direct reads: {seq}.\n\n" + "\n".join(lines)


def _header(report: dict) -> str:
    size = report["model_bytes"]
    copied = f" (private copy of {report['copied_from']})" if report.get("copied_from") else ""
    return (f"# mlx-flash benchmark\n\nCommand: `{report['command']}`\n\n"
            f"Code: {report['code']}\n\n"
            f"Machine: {report['machine']}\n\nModel: {report['model']}{copied} "
            f"({size / MIB:.0f} MiB on flash); prompt {len(report['prompt_ids'])} tokens, "
            f"{report['tokens']} generated (greedy, no EOS stop), dtype {report['dtype']}; "
            f"caps: {report['caps_note']}\n")


def _targets(s: dict) -> str:
    return (f"- cap {s['cap_bytes'] / MIB:.0f} MiB: vs naive "
            f"{fmt(s['vs_naive'], digits=2)}x (target 6x), vs mmap "
            f"{fmt(s['vs_mmap'], digits=2)}x (target 3x), vs llama.cpp "
            f"{fmt(s['vs_llama.cpp'], digits=2)}x, read time / ideal "
            f"{fmt(s['io_vs_ideal'], digits=2)} (target <= 1.3); leading "
            f"tokens equal to dense's: {s.get('flash_same_tokens', '-')}")


def markdown_report(report: dict) -> str:
    """results.md: header, the table, its column notes, targets, window sweep, disk."""
    parts = [_header(report), markdown_table(report["runs"], report["model_bytes"]),
             COLUMN_NOTES, "\n".join(notes(report["runs"]))]
    if report.get("speedups"):
        parts.append("\n## Targets (mlx-flash tok/s over ...)\n")
        parts += [_targets(s) for s in report["speedups"]]
    if report.get("window_sweep"):
        parts.append("\n## Bytes read per token vs window (replayed active sets)\n")
        for cap, sweep in report["window_sweep"].items():
            parts.append(f"- cap {cap}: " + ", ".join(f"w={w}: {b / MIB:.1f} MiB"
                                                    for w, b in sweep.items()))
    if report.get("disk"):
        parts.append("\n## Disk\n\n" + disk_table(report["disk"]))
    return "\n".join(parts) + "\n"


def write_report(report: dict, out: Path) -> None:
    """results.json, the plots and results.md under `out`; the markdown also on stdout."""
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    report["plots"] = plot_all(report, out)
    (out / "results.md").write_text(markdown_report(report))
    print(markdown_report(report))
    print(f"[bench] wrote {out / 'results.json'}, {out / 'results.md'} and "
          f"{len(report['plots'])} plots", file=sys.stderr)


# ---------------------------------------------------------------- plots


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (said on stderr) without matplotlib."""
    try:
        import matplotlib  # optional: the bench extra

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install -e \".[bench]\" in a checkout, "
              "or pip install matplotlib)", file=sys.stderr)
        return None
    return plt


def plot_all(report: dict, out: Path) -> list[str]:
    """PNG plots under out; returns their paths ([] without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return []
    paths = [plot_latency(report, out / "latency.png", plt),
             plot_caps(report, out / "tps_vs_cap.png", plt)]
    if report.get("window_sweep"):
        paths.append(plot_window(report, out / "bytes_vs_window.png", plt))
    if report.get("disk"):
        paths.append(plot_disk(report["disk"], out / "disk.png", plt))
    return [str(p) for p in paths]


def save_figure(fig, path: Path, plt) -> Path:
    """Lay out, write and close a figure (every plot ends here)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def line_plot(path: Path, plt, series: list[tuple[str, list, list]], xlabel: str, ylabel: str,
              *, hline: tuple[float, str] | None = None, marks: list[tuple] = (),
              log_y: bool = False, log2_ticks: list[int] | None = None,
              title: str | None = None) -> Path:
    """One 6x4 figure: a line with dots per (label, xs, ys), black crosses at `marks` (x, y),
    a dashed gray line at hline (y, label); log y, or a log2 x axis ticked at `log2_ticks`."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, xs, ys in series:
        ax.plot(xs, ys, marker="o", label=label)
    for x, y in marks:
        ax.plot(x, y, "kx")
    if hline is not None:
        ax.axhline(hline[0], ls="--", color="gray", label=hline[1])
    if log_y:
        ax.set_yscale("log")
    if log2_ticks is not None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(log2_ticks, [str(k) for k in log2_ticks])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    return save_figure(fig, path, plt)


def plot_latency(report: dict, path: Path, plt) -> Path:
    """Stacked bars: each run's ms per token by TIME_SPLIT part."""
    rows = [r for r in report["runs"] if r.get("split_ms")]
    labels = [r["name"] + " @ " + ("none" if r["cap_bytes"] is None
                                   else f"{r['cap_fraction']:.2f}x") for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for key in TIME_SPLIT:
        values = [r["split_ms"][key] for r in rows]
        ax.barh(labels, values, left=left, label=key)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_xlabel("ms per decoded token")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.set_title("Latency breakdown per token")
    return save_figure(fig, path, plt)


def plot_caps(report: dict, path: Path, plt) -> Path:
    """Decode tok/s against the cap, a line per contender, dense as a dashed line."""
    runs, series = report["runs"], []
    for name in dict.fromkeys(r["name"] for r in runs if r["cap_bytes"] is not None):
        pts = sorted((r["cap_fraction"], r["decode_tps"]) for r in runs
                     if r["name"] == name and r.get("decode_tps") and r["cap_bytes"])
        if pts:
            series.append((name, *zip(*pts, strict=True)))
    dense = next((r.get("decode_tps") for r in runs if r["name"] == "dense"), None)
    return line_plot(path, plt, series, "DRAM cap / model size", "decode tokens/s",
                     hline=(dense, "dense, no cap") if dense else None, log_y=True)


def plot_window(report: dict, path: Path, plt) -> Path:
    """MiB of new neurons per token against the window: replayed lines, measured crosses."""
    series = [(f"replayed, cap {cap}", [int(w) for w in sweep], [b / MIB for b in sweep.values()])
              for cap, sweep in report["window_sweep"].items()]
    marks = [(int(r["settings"]["window"]), r["bytes_needed_per_token"] / MIB)
             for r in report["runs"]
             if r["name"] in ("flash", "flash-window1") and r.get("bytes_needed_per_token")]
    return line_plot(path, plt, series, "window (tokens)",
                     "MiB of new neurons per token (x: measured)", marks=marks)


def plot_disk(disk: dict, path: Path, plt) -> Path:
    """O_DIRECT random-read MB/s against read size, a line per thread count."""
    series = [(f"random, {threads} threads", [int(k) for k in by_size],
               [v / 1e6 for v in by_size.values()]) for threads, by_size in disk["random"].items()]
    return line_plot(path, plt, series, "read size (KiB)", "MB/s (O_DIRECT)",
                     hline=(disk["sequential_best"] / 1e6, "sequential 1 MiB"),
                     log2_ticks=[int(k) for k in next(iter(disk["random"].values()))],
                     title="Read throughput vs read size and threads")
