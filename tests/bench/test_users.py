"""The users' regime of mlx_flash.bench (issue 20): caps from a GGUF's size, the grid's rules,
the report on fake results, perplexity against numpy, llama.cpp when it is absent.

Nothing here needs root, cgroups, llama_cpp or the real model (the last test needs the last
two and skips without them), and nothing asserts a timing.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash.bench.contenders as bench_contenders
import mlx_flash.bench.users as users
import mlx_flash.bench.worker as bench_worker
from mlx_flash.bench.caps import USERS_CAPS, fraction_caps
from mlx_flash.bench.perplexity import PPL_TEXT, llama_nll, mlx_nll, perplexity, token_nll
from mlx_flash.bench.users_report import GRID_COLUMNS, PPL_COLUMNS, markdown, write_users_report
from mlx_flash.offline.pull import DEFAULT_MODEL
from mlx_flash.runtime.loader import load_dense
from mlx_flash.spec.drafter import Drafter, init_params, save_drafter

MIB = 2**20
GGUF_1_5B = 1_117_320_768


# ---------------------------------------------------------------- caps and the grid


def test_fraction_caps_resolve_from_the_gguf_size():
    caps = fraction_caps(",".join(USERS_CAPS), GGUF_1_5B)
    assert caps == [GGUF_1_5B // 2, int(0.7 * GGUF_1_5B), GGUF_1_5B, int(1.3 * GGUF_1_5B), None]
    assert fraction_caps("1.3x, none ,0.25", 1000) == [1300, None, 250]


@pytest.mark.parametrize("bad", ["0", "-0.5", "lots", "700MiB", "500"])
def test_fraction_caps_refuse_what_is_not_a_fraction(bad):
    with pytest.raises(ValueError, match="fractions of the GGUF"):
        fraction_caps(bad, GGUF_1_5B)


def test_cells_run_uncapped_first_then_largest_cap():
    assert users.cell_order([100, None, 300, 200]) == [None, 300, 200, 100]
    assert users.cell_order([5, 7]) == [7, 5]


def test_dense_runs_only_where_it_fits():
    uncapped = {"status": "ok", "peak_rss_bytes": 800 * MIB}
    assert users.dense_misfit(None, uncapped) is None
    assert users.dense_misfit(900 * MIB, uncapped) is None
    assert "800 MiB" in users.dense_misfit(700 * MIB, uncapped)
    assert users.dense_misfit(700 * MIB, {"status": "oom"}) is None  # unknown: run it


def test_grid_skips_dense_below_its_uncapped_peak(monkeypatch, tmp_path):
    seen = []

    def fake_run_one(setup, c, cap, task):
        seen.append((c.name, cap, task))
        return {"name": c.name, "cap_bytes": cap, "status": "ok", "peak_rss_bytes": 500}

    monkeypatch.setattr(users, "run_one", fake_run_one)
    setup = users.Setup(tmp_path, 1000, tmp_path, [1, 2], 4, None, 10, None, False)
    cs = users.users_contenders(["flash", "dense"], tmp_path, None, "absent")
    rows = users.run_grid(setup, cs, [400, None, 600])
    assert seen == [("flash", None, "generate"), ("flash", 600, "generate"),
                    ("flash", 400, "generate"), ("dense", None, "generate"),
                    ("dense", 600, "generate")]
    assert rows[-1]["status"] == "skipped" and rows[-1]["cap_bytes"] == 400
    assert "500 B" not in rows[-1]["error"] and "peak RSS" in rows[-1]["error"]


def test_a_cell_stops_decoding_after_its_time_limit():
    clock = bench_worker.Clock()
    clock.first, clock.last = {"t": 10.0}, {"t": 200.0}
    assert bench_worker.enough(clock, 64, 64, None)
    assert not bench_worker.enough(clock, 5, 64, None)  # no limit: all 64
    assert bench_worker.enough(clock, 5, 64, 180.0)  # 190 s since the first token
    assert not bench_worker.enough(clock, 2, 64, 180.0)  # too few tokens for a rate
    assert not bench_worker.enough(clock, 5, 64, 300.0)


def test_users_contenders(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    (tmp_path / "drafter.safetensors").write_bytes(b"x")
    by = {c.name: c for c in users.users_contenders(list(users.USERS_CONTENDERS), tmp_path,
                                                    gguf, None)}
    assert by["llama.cpp"].options == {"gguf": str(gguf), "n_threads": 2}
    assert not by["llama.cpp"].skip and by["flash"].options["drafter"] is True
    assert by["naive"].options["naive"] is True and by["dense"].capped
    (tmp_path / "drafter.safetensors").unlink()
    by = {c.name: c for c in users.users_contenders(["flash"], tmp_path, gguf, None)}
    assert "drafter" not in by["flash"].options


def test_flash_dirs_add_flash_contenders_on_other_dirs(tiny_dirs, tmp_path):
    _, flash_dir = tiny_dirs("qwen2")
    base = users.users_contenders(["flash", "naive"], tmp_path, None, None)
    extra = users.extra_flash_contenders(f"flash-other={flash_dir}", base)
    assert [c.name for c in extra] == ["flash-other"] and extra[0].kind == "flash"
    assert extra[0].options["model_dir"] == str(flash_dir)
    assert "resident 16-bit" in extra[0].label
    assert users.extra_flash_contenders(None, base) == []
    with pytest.raises(ValueError, match="NAME=DIR"):
        users.extra_flash_contenders(f"flash-x={tmp_path}", base)  # no manifest there
    with pytest.raises(ValueError, match="needs the flash contender"):
        users.extra_flash_contenders(f"flash-other={flash_dir}", base[1:])
    (gated,) = users.extra_flash_contenders(f"flash-g50={flash_dir}@gate:0.5", base)
    assert gated.options["selector"] == "gate" and gated.options["keep"] == 0.5
    assert "oracle_rule" not in gated.options and "selector gate:0.5" in gated.label


def test_a_sparse_flash_contender_is_scored_in_decode_sized_calls(tiny_dirs, flash_load):
    """Perplexity of a selector that keeps fewer neurons goes through the decode path (where
    it selects); every neuron, or no flash model, in 128-token calls."""
    _, flash_dir = tiny_dirs("qwen2")
    model, _ = flash_load(flash_dir, selector="quant", keep=0.5)
    assert bench_worker.ppl_chunk(model) == model.flash.config.max_sparse_tokens == 16
    model, _ = flash_load(flash_dir)
    assert bench_worker.ppl_chunk(model) == 128
    assert bench_worker.ppl_chunk(load_dense(flash_dir)[0]) == 128


def test_llama_cpp_absent_is_a_skipped_contender_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_contenders.importlib.util, "find_spec",
                        lambda name: None if name == "llama_cpp" else object())
    reason = bench_contenders.llama_cpp_available()
    assert "pip install llama-cpp-python" in reason
    (llama,) = users.users_contenders(["llama.cpp"], tmp_path, tmp_path / "m.gguf", reason)
    assert llama.skip == reason
    setup = users.Setup(tmp_path, 1000, tmp_path, [1, 2], 4, None, 10, None, False)
    row = users.run_one(setup, llama, 500)
    assert row["status"] == "skipped" and row["error"] == reason


# ---------------------------------------------------------------- resolving --model


def test_resolve_model_name_pulls_and_converts_once(monkeypatch, tmp_path):
    calls = []
    gguf = tmp_path / DEFAULT_MODEL / "model.gguf"

    def fake_convert(src, out, bits):
        calls.append((src, out, bits))
        Path(out).mkdir(parents=True)
        (Path(out) / "manifest.json").write_text("{}")

    monkeypatch.setattr(users, "pull", lambda name, models_dir, progress: gguf)
    monkeypatch.setattr(users, "convert", fake_convert)
    want = tmp_path / DEFAULT_MODEL / users.Q4_DIR
    assert users.resolve_model("default", tmp_path) == (want, gguf)
    assert users.resolve_model(DEFAULT_MODEL, tmp_path) == (want, gguf)
    assert calls == [(gguf, want, 4)]


def test_resolve_model_dir(tiny_dirs, tmp_path):
    _, flash = tiny_dirs("qwen2")
    assert users.resolve_model(str(flash)) == (flash, None)  # converted from safetensors
    assert users.resolve_model(str(flash), gguf=tmp_path / "x.gguf")[1] == tmp_path / "x.gguf"
    with pytest.raises(FileNotFoundError, match="nope.*neither a known model"):
        users.resolve_model(str(tmp_path / "nope"))


# ---------------------------------------------------------------- perplexity


def _direct_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target], the textbook way, in float64."""
    z = logits.astype(np.float64)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return -np.log(p[np.arange(len(targets)), targets])


def test_token_nll_is_the_textbook_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 50)).astype(np.float32) * 3
    targets = rng.integers(0, 50, size=7)
    np.testing.assert_allclose(token_nll(logits, targets), _direct_nll(logits, targets),
                               rtol=1e-10)
    big = logits + 1000  # no overflow: the max is taken out first (f32 rounding of +1000 left)
    with np.errstate(all="ignore"):
        assert not np.isfinite(_direct_nll(big, targets)).all()  # the textbook way overflows
    np.testing.assert_allclose(token_nll(big, targets), _direct_nll(logits, targets), atol=2e-4)
    assert perplexity(np.array([math.log(4.0)] * 3)) == pytest.approx(4.0)


def test_mlx_nll_on_a_tiny_model_equals_numpy_on_the_full_logits(tiny_dirs):
    _, flash = tiny_dirs("qwen2")
    model, _ = load_dense(flash, dtype="float32")
    ids = [int(i) for i in np.random.default_rng(1).integers(3, 40, size=23)]
    full = np.array(model(mx.array(ids)[None])[0].astype(mx.float32))  # (T, V), one pass
    want = _direct_nll(full[:-1], np.array(ids[1:]))
    got = mlx_nll(model, ids, chunk=5)  # five chunks through one KV cache
    assert got.shape == (len(ids) - 1,)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        mlx_nll(model, ids[:1])


class FakeLlama:
    """llama_cpp.Llama's eval/scores with logits_all=True: row i is the logits after ids[i]."""

    def __init__(self, table: np.ndarray):
        self.table, self.scores = table, None

    def reset(self):
        self.scores = None

    def eval(self, ids):
        self.scores = np.concatenate([self.table[ids], np.zeros((8, self.table.shape[1]))])


def test_llama_nll_scores_row_i_against_token_i_plus_1():
    table = np.random.default_rng(2).normal(size=(30, 30)).astype(np.float32)
    ids = [3, 7, 1, 29, 4]
    want = _direct_nll(table[ids[:-1]], np.array(ids[1:]))
    np.testing.assert_allclose(llama_nll(FakeLlama(table), ids), want, rtol=1e-9)


def _ppl_spec(flash: Path, tmp_path: Path, kind: str, ids: list[int],
              options: dict | None = None, cap: int | None = None) -> Path:
    spec = {"kind": kind, "model": str(flash), "options": options or {}, "cap": cap,
            "dtype": "float32",
            "prompt_ids": [3, 4], "tokens": 2, "force_direct": False, "unbundled_dir": None,
            "record_ids": False, "ids_file": str(tmp_path / "ids.npz"), "task": "ppl",
            "ppl_ids": ids, "result_file": str(tmp_path / f"ppl_{kind}.json")}
    path = tmp_path / f"spec_ppl_{kind}.json"
    path.write_text(json.dumps(spec))
    return path


def test_worker_ppl_task_flash_equals_dense(tiny_dirs, tmp_path):
    _, flash = tiny_dirs("qwen2")
    ids = [int(i) for i in np.random.default_rng(3).integers(3, 40, size=30)]
    results = {}
    for kind in ("dense", "flash"):  # flash planned for a shorter context: widened to the text
        # (a budget the plan cannot refuse: this process may hold a real model already)
        spec = _ppl_spec(flash, tmp_path, kind, ids, {"max_kv_tokens": 4} if kind == "flash"
                         else None, 1 << 40 if kind == "flash" else None)
        assert bench_worker.worker_main(str(spec)) == 0
        results[kind] = json.loads(Path(json.loads(spec.read_text())["result_file"]).read_text())
        assert results[kind]["status"] == "ok", results[kind].get("traceback")
        assert results[kind]["ppl_tokens"] == len(ids) - 1 and "decode_tps" not in results[kind]
    model, _ = load_dense(flash, dtype="float32")
    want = perplexity(mlx_nll(model, ids))
    assert results["dense"]["ppl"] == pytest.approx(want, rel=1e-4)
    assert results["flash"]["ppl"] == pytest.approx(want, rel=1e-3)  # every neuron: exact


def test_worker_flash_with_the_dirs_drafter_emits_the_same_tokens(tiny_dirs, tmp_path):
    _, shared = tiny_dirs("qwen2")
    flash = shutil.copytree(shared, tmp_path / "flash")  # the drafter goes into a copy
    model, _ = load_dense(flash)
    save_drafter(Drafter(init_params(64, 1, seed=1), np.arange(256)).attach(model, flash), flash)
    (c,) = users.users_contenders(["flash"], flash, None, "absent")
    assert c.options["drafter"] is True
    out = {}
    for name, options in (("plain", {k: v for k, v in c.options.items() if k != "drafter"}),
                          ("drafter", c.options)):
        spec = {"kind": "flash", "model": str(flash), "options": options, "cap": None,
                "dtype": "float32", "prompt_ids": [5, 9, 17, 33, 65, 7], "tokens": 10,
                "force_direct": False, "unbundled_dir": None, "record_ids": False,
                "ids_file": str(tmp_path / "ids.npz"), "task": "generate", "ppl_ids": None,
                "result_file": str(tmp_path / f"gen_{name}.json")}
        (tmp_path / f"spec_{name}.json").write_text(json.dumps(spec))
        assert bench_worker.worker_main(str(tmp_path / f"spec_{name}.json")) == 0
        out[name] = json.loads((tmp_path / f"gen_{name}.json").read_text())
        assert out[name]["status"] == "ok", out[name].get("traceback")
    assert out["drafter"]["drafter"] is True and out["plain"]["drafter"] is False
    assert out["drafter"]["tokens_out"] == out["plain"]["tokens_out"]  # greedy: the same
    assert len(out["drafter"]["tokens_out"]) == 10


def test_the_fixed_text_is_long_enough():
    assert len(PPL_TEXT.split()) > 400  # ~600 Qwen tokens; 512 are scored


# ---------------------------------------------------------------- the report


def _cell(name, cap, status="ok", tps=None, **extra):
    return {"name": name, "label": f"{name} label", "kind": "flash", "cap_bytes": cap,
            "cap_fraction": None if cap is None else cap / GGUF_1_5B, "io_mode": "cgroup cap",
            "task": "generate", "status": status, "decode_tps": tps,
            "ms_per_token": 1e3 / tps if tps else None, **extra}


def fake_report() -> dict:
    caps = fraction_caps("0.5,1.0,none", GGUF_1_5B)
    runs = [_cell("flash", None, tps=12.0, disk_bytes_per_token=0.0,
                  cgroup={"max_usage_bytes": 900 * MIB, "failcnt": 0, "oom_kills": 0}),
            _cell("flash", caps[1], tps=4.0, disk_bytes_per_token=50 * MIB,
                  bytes_read_per_token=48 * MIB, tokens_out=[7] * 64, load_s=2.04, ttft_s=3.216),
            _cell("flash", caps[0], "refused", error="dram_budget 533 MiB is too small | a b\n"
                  "second line"),
            _cell("llama.cpp", None, tps=10.0), _cell("llama.cpp", caps[1], tps=0.5,
                                                       tokens_out=[7] * 12),
            _cell("llama.cpp", caps[0], "oom", oom_killed=True,
                  error="killed by the OOM killer under the cap"),
            _cell("dense", caps[0], "skipped", error="does not fit: its peak RSS ...")]
    ppl = [{**_cell("flash", None), "task": "ppl", "ppl": 9.8765, "ppl_tokens": 511},
           {**_cell("llama.cpp", None, "skipped", error="llama-cpp-python is not installed"),
            "task": "ppl"}]
    return {"regime": "users", "command": "mlx-flash bench --regime users", "machine": "box",
            "model": "/m/flash-q4", "model_name": "qwen-1.5b", "gguf": "/m/model.gguf",
            "gguf_bytes": GGUF_1_5B, "code": {"git": "abc"}, "caps": caps, "cgroup": True,
            "tokens": 64, "cell_seconds": 180.0, "prompt": "p", "prompt_ids": [1, 2, 3], "ppl_text_tokens": 512,
            "runs": runs, "perplexity": ppl}


def test_markdown_tables_of_fake_results():
    text = markdown(fake_report())
    grid = [line for line in text.splitlines() if line.startswith("| ") and " MiB (" in line
            or line.startswith("| none")]
    assert len(grid) == 7
    assert {line.count(" | ") + 2 for line in grid} == {len(GRID_COLUMNS) + 1}
    assert "| 533 MiB (0.50x) | flash | refused |" in text
    assert "dram_budget 533 MiB is too small \\| a b |" in text and "second line" not in text
    assert "| 1066 MiB (1.00x) | flash | ok | 64 | 4.00 | 250 | 50.0 | 48.0 |" in text
    assert "| 2.0 | 3.22 |  |" in text  # load s, ttft s of the 1.0x flash cell
    assert "| 1066 MiB (1.00x) | llama.cpp | ok | 12 | 0.50 |" in text
    assert "stops decoding 180 s after its first token" in text
    assert "| 533 MiB (0.50x) | llama.cpp | oom |" in text
    assert "| none | flash | ok | - | 12.00 | 83 | 0.0 | - | 900 |" in text
    assert "| flash | 9.877 | 511 | ok |" in text
    assert f"| {' | '.join(PPL_COLUMNS)} |" in text
    assert "users' regime: qwen-1.5b" in text and "page cache included" in text


def test_write_users_report_json_markdown_and_plot(tmp_path, capsys):
    report = fake_report()
    write_users_report(report, tmp_path / "out")
    back = json.loads((tmp_path / "out" / "results.json").read_text())
    assert back["runs"] == report["runs"] and back["perplexity"][0]["ppl"] == 9.8765
    assert (tmp_path / "out" / "results.md").read_text() == markdown(report)
    assert "| none | flash | ok |" in capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401  (optional: the bench extra)
    except ImportError:
        assert back["plots"] == []
        pytest.skip("matplotlib is not installed: the plot is not drawn (checked: none listed)")
    png = tmp_path / "out" / "tps_vs_cap.png"
    assert back["plots"] == [str(png)] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- llama.cpp, when present


def test_llama_cpp_perplexity_on_the_default_gguf():
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    gguf = Path.home() / ".cache" / "mlx_flash" / "models" / DEFAULT_MODEL / "model.gguf"
    if not gguf.exists():
        pytest.skip(f"{gguf} is absent: `mlx-flash pull` fetches it (~0.5 GB)")
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, n_threads=2, logits_all=True,
                          verbose=False)
    ids = llm.tokenize(PPL_TEXT.encode(), add_bos=False)[:32]
    nll = llama_nll(llm, ids)
    assert nll.shape == (31,) and np.isfinite(nll).all()
    assert 1.0 < perplexity(nll) < 200.0  # a real model on English and code, not noise
