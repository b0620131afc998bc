"""mlx_flash.bench: the pure parts, the baselines, the worker.

Nothing here needs root, cgroups or the real model, and nothing asserts a timing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash.accel.build as accel_build
import mlx_flash.bench.caps as bench_caps
import mlx_flash.bench.contenders as bench_contenders
import mlx_flash.bench.harness as bench_harness
import mlx_flash.bench.replay as bench_replay
import mlx_flash.bench.report as bench_report
import mlx_flash.bench.worker as bench_worker
from mlx_flash.bench.baselines import UnbundledStore, load_mmap, segments, write_unbundled
from mlx_flash.format.manifest import read_manifest
from mlx_flash.runtime.loader import load_dense
from mlx_flash.runtime.store import NeuronStore

MIB = 2**20
PROMPT = list(range(3, 25))  # 22 tokens: longer than max_sparse_tokens, so prefill streams


# ---------------------------------------------------------------- caps


def test_parse_cap_forms():
    size = 1000 * MIB
    assert bench_caps.parse_cap("0.5", size) == 500 * MIB
    assert bench_caps.parse_cap("1.0", size) == size
    assert bench_caps.parse_cap("1.5x", size) == 1500 * MIB
    assert bench_caps.parse_cap("700MiB", size) == 700 * MIB
    assert bench_caps.parse_cap("2GB", size) == 2 * 10**9
    assert bench_caps.parse_cap("none", size) is None
    assert bench_caps.parse_caps("0.4, 1.0,none", size) == [400 * MIB, size, None]


@pytest.mark.parametrize("bad", ["100", "12kb", "fastx", "lots"])
def test_parse_cap_rejects_nonsense(bad):
    with pytest.raises(ValueError, match="cap|dram_budget"):
        bench_caps.parse_cap(bad, 1000 * MIB)


def test_fraction_of_a_tiny_model_is_allowed():
    assert bench_caps.parse_cap("0.5", 10_000) == 5_000  # fractions are never "too small"


# ---------------------------------------------------------------- contenders


def test_contenders_without_predictors_or_llama():
    cs = bench_contenders.build_contenders(list(bench_contenders.ALL_CONTENDERS), False, 0.3,
                                           None, "not installed")
    by = {c.name: c for c in cs}
    assert [c.name for c in cs] == list(bench_contenders.ALL_CONTENDERS)
    assert by["flash"].options["oracle_rule"] == "all" and "every neuron" in by["flash"].label
    assert by["flash-no-predictor"].options["oracle_rule"] == "top"
    assert not by["flash-no-predictor"].skip and by["llama.cpp"].skip == "not installed"
    assert by["flash-window1"].options["window"] == 1
    assert by["flash-threads1"].options["threads"] == 1
    assert by["flash-no-bundling"].options["unbundled"] is True
    assert by["naive"].options["naive"] is True and not by["dense"].capped


def test_contenders_pick_up_predictors(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    names = ["flash", "flash-no-predictor", "llama.cpp"]
    by = {c.name: c for c in bench_contenders.build_contenders(names, True, 0.3, gguf, None)}
    assert by["flash"].options["selector"] == "predictor"
    assert by["flash-no-predictor"].options["selector"] == "oracle"
    assert not by["flash-no-predictor"].skip and not by["llama.cpp"].skip
    with pytest.raises(ValueError, match="unknown contenders"):
        bench_contenders.build_contenders(["flash", "vllm"], True, 0.3, None, None)


# ---------------------------------------------------------------- child, results, table


def test_child_joins_the_cgroup_before_python(tmp_path):
    cmd = bench_harness.child_command(tmp_path / "spec.json", tmp_path / "cgroup.procs")
    assert cmd[:2] == ["sh", "-c"] and "echo $$ >" in cmd[2] and 'exec "$@"' in cmd[2]
    worker = [sys.executable, "-m", "mlx_flash.bench.worker", str(tmp_path / "spec.json")]
    assert cmd[4:] == worker
    assert bench_harness.child_command(tmp_path / "spec.json", None) == worker


def test_read_result_statuses(tmp_path):
    missing = str(tmp_path / "none.json")
    cg = {"max_usage_bytes": 1, "failcnt": 3, "oom_kills": 1}
    assert bench_harness.read_result(missing, -9, cg)["status"] == "oom"
    assert bench_harness.read_result(missing, None, None)["status"] == "timeout"
    assert bench_harness.read_result(missing, 1, None)["status"] == "crashed"
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"status": "ok", "decode_tps": 2.0}))
    assert bench_harness.read_result(str(path), 0, {**cg, "oom_kills": 0}) == {
        "status": "ok", "decode_tps": 2.0, "oom_killed": False}


def _row(name, cap, tps, **extra):
    row = {"name": name, "label": name, "kind": "flash", "cap_bytes": cap,
           "cap_fraction": None if cap is None else cap / (1000 * MIB), "io_mode": "cgroup cap",
           "status": "ok", "decode_tps": tps, "ms_per_token": 1e3 / tps, **extra}
    return bench_report.derive(row, seq_throughput=1e9)


def test_derive_split_and_io_ratio():
    r = _row("flash", 500 * MIB, 2.0, bytes_read_per_token=1e8,
             predictor_bytes_per_token=0.0,
             flash_seconds_per_token={"predictor": 0.1, "io": 0.2, "memory": 0.05,
                                      "compute": 0.1})
    assert r["split_ms"]["rest"] == pytest.approx(500 - 450)
    assert r["read_throughput"] == pytest.approx(5e8)
    assert r["io_vs_ideal"] == pytest.approx(2.0)  # 200 ms for what 1 GB/s reads in 100 ms
    mm = _row("mmap", 500 * MIB, 1.0, ffn_unsplit_s_per_token=0.6)
    assert mm["split_ms"]["ffn_unsplit"] == pytest.approx(600) and "io_vs_ideal" not in mm


def test_speedups_and_table():
    cap = 500 * MIB
    rows = [_row("flash", cap, 6.0), _row("naive", cap, 1.0),
            _row("mmap", cap, 3.0),
            {"name": "llama.cpp", "label": "l", "kind": "llama_cpp", "cap_bytes": cap,
             "cap_fraction": 0.5, "io_mode": "cgroup cap", "status": "oom", "oom_killed": True,
             "cgroup": {"max_usage_bytes": cap, "failcnt": 9, "oom_kills": 1}}]
    (s,) = bench_report.speedups(rows)
    assert s["vs_naive"] == pytest.approx(6.0) and s["vs_mmap"] == pytest.approx(2.0)
    assert s["vs_llama.cpp"] is None
    table = bench_report.markdown_table(rows, 1000 * MIB).splitlines()
    assert len(table) == 2 + len(rows)
    widths = {line.count("|") for line in table}
    assert widths == {len(bench_report.TABLE_COLUMNS) + 1}
    assert "| 500 MiB (0.50x) | flash | ok | 6.00 | 167 |" in table[2]
    assert "| oom |" in table[-1] and "| 500 |" in table[-1]


def test_markdown_report_sections():
    cap = 500 * MIB
    rows = [_row("flash", cap, 6.0), _row("naive", cap, 1.0)]
    report = {"command": "benchmark.py --model m", "code": {"git": "abc"}, "machine": "box",
              "model": "m", "model_bytes": 1000 * MIB, "prompt_ids": [1, 2], "tokens": 4,
              "dtype": "bfloat16", "caps_note": "500 MiB", "runs": rows,
              "speedups": bench_report.speedups(rows), "window_sweep": {"500 MiB": {"1": 2 * MIB}},
              "disk": None}
    text = bench_report.markdown_report(report)
    assert "Command: `benchmark.py --model m`" in text and "| 500 MiB (0.50x) | flash |" in text
    assert "vs naive 6.00x (target 6x)" in text and "w=1: 2.0 MiB" in text


def test_disk_table():
    disk = {"sequential_1mib": {"1": 1e9, "4": 2e9}, "sequential_best": 2e9,
            "random": {"1": {"4": 1e8, "1024": 9e8}, "8": {"4": 3e8, "1024": 1.5e9}}}
    text = bench_report.disk_table(disk)
    assert "1 thread(s) 1000 MB/s" in text and "| 4 KiB | 100 | 300 |" in text


def test_calls_round_trip(tmp_path):
    calls = [(0, [np.array([3, 1], np.int32), np.array([2], np.int32)]),
             (1, [np.array([5], np.int32)]), (0, [np.array([], np.int32)])]
    bench_worker.save_calls(tmp_path / "ids.npz", calls)
    back = bench_worker.load_calls(tmp_path / "ids.npz")
    assert [layer for layer, _ in back] == [0, 1, 0]
    for (_, a), (_, b) in zip(calls, back, strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- baselines


@pytest.mark.parametrize("arch,dtype", [("qwen2", "float32"), ("llama", "bfloat16"),
                                        ("nemotron", "float32"), ("starcoder2", "float32")])
def test_mmap_ffn_equals_dense(tiny_dirs, arch, dtype):
    _, flash = tiny_dirs(arch, dtype)
    dense, _ = load_dense(flash, dtype="float32")
    mapped, _ = load_mmap(flash, dtype="float32", chunk=48)  # several chunks per layer
    x = mx.random.normal((1, 3, dense.args.hidden_size), key=mx.random.key(0))
    for layer in range(len(dense.layers)):
        want, got = dense.layers[layer].mlp(x), mapped.layers[layer].mlp(x)
        assert mx.allclose(want, got, atol=1e-4, rtol=1e-4).item()
    ids = mx.array([[3, 5, 7, 9, 11]])
    assert mx.allclose(dense(ids), mapped(ids), atol=1e-3, rtol=1e-3).item()


@pytest.mark.parametrize("arch,dtype", [("qwen2", "float16"), ("starcoder2", "bfloat16")])
def test_mmap_fast_cpu_equals_dense(tiny_dirs, arch, dtype):

    if accel_build.unavailable_reason():
        pytest.skip(f"CPU kernels: {accel_build.unavailable_reason()}")
    _, flash = tiny_dirs(arch, dtype)
    dense, _ = load_dense(flash, dtype="float32")
    mapped, _ = load_mmap(flash, chunk=48, fast_cpu=True)
    assert mapped.layers[0].mlp._fast is not None
    ids = mx.array([[3, 5, 7, 9, 11]])
    assert mx.allclose(dense(ids), mapped(ids), atol=2e-3, rtol=2e-3).item()


@pytest.mark.parametrize("arch", ["qwen2", "nemotron"])
@pytest.mark.parametrize("direct", [False, True])
def test_unbundled_store_reads_the_same_rows(tiny_dirs, tmp_path, arch, direct):
    _, flash = tiny_dirs(arch)
    manifest = read_manifest(flash)
    out = write_unbundled(flash, tmp_path / "unbundled")
    assert write_unbundled(flash, out) == out  # second call: already there
    ids = np.array([0, 1, 2, 9, 40, 41, manifest.layers[1].n_neurons - 1])
    with NeuronStore(flash, manifest, direct=direct) as a, \
            UnbundledStore(flash, manifest, out, direct=direct) as b:
        want, stats_a = a.read(1, ids)
        got, stats_b = b.read(1, ids)
    assert np.array_equal(want, got)
    n_segments = len(segments(manifest.ffn, manifest.layers[1].stride))
    assert stats_b.reads == stats_a.reads * n_segments


# ---------------------------------------------------------------- the worker


def _spec(flash: Path, tmp_path: Path, kind: str, options: dict, **extra) -> Path:
    spec = {"kind": kind, "model": str(flash), "options": options, "cap": None,
            "dtype": "float32", "prompt_ids": PROMPT, "tokens": 4, "force_direct": False,
            "unbundled_dir": None, "record_ids": False,
            "ids_file": str(tmp_path / f"ids_{kind}.npz"),
            "result_file": str(tmp_path / f"result_{kind}.json"), **extra}
    path = tmp_path / f"spec_{kind}.json"
    path.write_text(json.dumps(spec))
    return path


def _work(spec: Path) -> dict:
    assert bench_worker.worker_main(str(spec)) == 0
    return json.loads(Path(json.loads(spec.read_text())["result_file"]).read_text())


def test_worker_flash_result_is_well_formed(tiny_dirs, tmp_path):
    _, flash = tiny_dirs("qwen2")
    options, _ = bench_contenders.flash_defaults(False, 0.3)
    result = _work(_spec(flash, tmp_path, "flash", options, record_ids=True))
    assert result["status"] == "ok", result.get("traceback")
    assert len(result["tokens_out"]) == 4 and len(result["token_times_s"]) == 4
    for key in ("baseline_rss_bytes", "peak_rss_bytes", "load_s", "ms_per_token",
                "decode_tps", "bytes_read_per_token", "reads_per_token", "hit_rate"):
        assert result[key] is not None and result[key] >= 0, key
    assert set(result["flash_seconds_per_token"]) == {"predictor", "io", "memory", "compute"}
    assert result["peak_rss_bytes"] >= result["baseline_rss_bytes"] > 0
    # Replaying the recorded active sets through the window gives the bytes the run needed
    # (what it read, less the gaps the read planner chose to cross).
    sweep = bench_replay.window_sweep(Path(result["ids_file"]), flash,
                               int(result["memory_plan"]["capacity"]), windows=[5])
    assert sweep[5] == pytest.approx(result["bytes_needed_per_token"])
    assert result["bytes_read_per_token"] >= result["bytes_needed_per_token"]


def test_worker_dense_and_mmap_agree(tiny_dirs, tmp_path):
    _, flash = tiny_dirs("qwen2")
    dense = _work(_spec(flash, tmp_path, "dense", {}))
    mapped = _work(_spec(flash, tmp_path, "mmap", {}))
    assert dense["status"] == mapped["status"] == "ok"
    assert dense["tokens_out"] == mapped["tokens_out"]
    assert mapped["ffn_unsplit_s_per_token"] >= 0


def test_worker_reports_a_refused_budget(tiny_dirs, tmp_path):
    _, flash = tiny_dirs("qwen2")
    result = _work(_spec(flash, tmp_path, "flash", {}, cap=1000))
    assert result["status"] == "refused" and "too small" in result["error"]


def test_source_stamp_covers_the_kernel_sources(tmp_path, monkeypatch):
    """A run's stamp changes with the C kernels, not only with the Python sources."""
    (tmp_path / "cpu_kernels.c").write_text("int a;\n")
    monkeypatch.setenv("MLX_FLASH_KERNEL_DIR", str(tmp_path))
    before = bench_report.source_stamp()["sources_sha256"]
    (tmp_path / "cpu_kernels.c").write_text("int b;\n")
    assert bench_report.source_stamp()["sources_sha256"] != before
    assert [p.name for p in bench_report.kernel_sources()] == ["cpu_kernels.c"]
