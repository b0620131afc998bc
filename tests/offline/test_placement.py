"""Read planning, the disk cost model, neuron placement and pinning (issue 9)."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate

import mlx_flash.bench.contenders as bench_contenders
import mlx_flash.bench.replay as bench_replay
import mlx_flash.offline.calibrate_disk as disk
import mlx_flash.offline.calibrate_disk as offline_calibrate_disk
import mlx_flash.runtime.disk as runtime_disk
from mlx_flash.format.errors import FormatError
from mlx_flash.format.manifest import decode_ids, encode_ids, read_manifest
from mlx_flash.offline.placement import (
    coact_order,
    evaluate,
    new_sets,
    place,
)
from mlx_flash.runtime.cache import NeuronCache
from mlx_flash.runtime.loader import load, load_dense
from mlx_flash.runtime.planner import plan_reads, span_bytes
from mlx_flash.runtime.store import NeuronStore

PROMPT = [5, 9, 17, 33, 65, 129, 7, 8]
# A disk where a read costs 100 us up to 64 KiB: crossing gaps pays.
SLOW_READS = runtime_disk.CostModel(device="0:0", random={"8": {"4": 40e6, "64": 640e6, "1024": 1e9}})
# A disk where every byte costs the same (no per-read cost): crossing gaps never pays.
FLAT = runtime_disk.CostModel(device="0:0", random={"8": {"4": 1e9, "1024": 1e9}})


def greedy(model, tokenizer, n=10):
    return generate(model, tokenizer, PROMPT, max_tokens=n, verbose=False)


# ---------------------------------------------------------------- the planner


@pytest.mark.parametrize("planner", ["neuron", "runs", "cost"])
@pytest.mark.parametrize("direct", [False, True])
def test_spans_cover_exactly_the_needed_positions(planner, direct):
    rng = np.random.default_rng(1)
    for k in (0, 1, 7, 100, 900):
        pos = np.sort(rng.choice(1000, k, replace=False))
        plan = plan_reads(pos, 1536, planner, SLOW_READS, direct=direct)
        covered = np.concatenate([np.arange(s, e) for s, e in plan.spans] or [np.zeros(0)])
        assert np.all(np.diff(covered) > 0)  # sorted, no overlap
        assert np.isin(pos, covered).all()  # every needed position is read
        assert np.isin(plan.starts, pos).all() and np.isin(plan.stops - 1, pos).all()
        if planner != "cost":
            assert covered.size == k  # no gap crossed
        if planner == "neuron":
            assert plan.starts.size == k


def test_cost_planner_crosses_gaps_only_when_reads_cost():
    pos = np.array([0, 2, 4, 6, 40, 41])
    merged = plan_reads(pos, 1536, "cost", SLOW_READS)
    assert merged.spans == [(0, 42)] or merged.spans == [(0, 7), (40, 42)]
    assert merged.seconds < plan_reads(pos, 1536, "runs", SLOW_READS).seconds
    assert plan_reads(pos, 1536, "cost", FLAT).spans == [(0, 1), (2, 3), (4, 5), (6, 7),
                                                          (40, 42)]
    assert span_bytes(np.array([1]), np.array([2]), 1536, True)[0] == 4096  # O_DIRECT pages


def test_store_reads_the_same_rows_with_every_planner(tiny_dirs):
    _, flash = tiny_dirs("qwen2")
    manifest = read_manifest(flash)
    ids = np.array([0, 3, 5, 6, 50, 90, 127])
    with NeuronStore(flash, manifest) as ref:
        want, _ = ref.read(1, ids)
    for planner in ("neuron", "cost"):
        with NeuronStore(flash, manifest, planner=planner, cost=SLOW_READS) as store:
            got, stats = store.read(1, ids)
        assert np.array_equal(got, want)
        assert stats.needed == ids.size * manifest.layers[1].stride
        assert stats.amplification >= 1.0
    with pytest.raises(ValueError, match="cost model"):
        NeuronStore(flash, manifest, planner="cost")


def test_streaming_a_layer_is_one_read_per_chunk_whatever_the_planner(tiny_dirs):
    _, flash = tiny_dirs("qwen2")
    manifest = read_manifest(flash)
    with NeuronStore(flash, manifest, planner="neuron") as store:
        reads = [stats.reads for _, _, stats in store.iter_layer(0, 50)]
    assert reads == [1, 1, 1]  # 128 neurons in chunks of 50


# ---------------------------------------------------------------- the cost model file


def test_cost_model_round_trip_and_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "home"))
    assert runtime_disk.cost_model_for(tmp_path) is None
    dest = runtime_disk.save(SLOW_READS, runtime_disk.model_path(tmp_path))
    assert dest.parent == tmp_path / "home" / "disk"
    back = runtime_disk.cost_model_for(tmp_path)
    assert back == SLOW_READS
    sizes = np.array([4096, 65536, 2 << 20])
    assert np.allclose(back.read_seconds(sizes), [4096 / 40e6, 65536 / 640e6, (2 << 20) / 1e9])
    assert runtime_disk.FALLBACK.latency() > 0 and runtime_disk.FALLBACK.bandwidth() > 1e9


@pytest.mark.parametrize("text", ["{not json", "[]", '{"device": "1:2"}',
                                  '{"device": "1:2", "random": {"8": {"4": -1}}}',
                                  '{"device": "1:2", "random": {"8": {"4": 1e8}}, "version": 9}'])
def test_corrupt_cost_model_is_rejected_naming_the_file(tmp_path, monkeypatch, text):
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path))
    path = runtime_disk.model_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(runtime_disk.CostModelError, match=f"{path.name}.*calibrate-disk"):
        runtime_disk.cost_model_for(tmp_path)


# ---------------------------------------------------------------- placement


def fake_calibration(out, manifest, tokens=192, seq_len=64, seed=0):
    """Structured |activations|: neurons fire in groups, so co-activation has signal."""
    rng = np.random.default_rng(seed)
    n = manifest.layers[0].n_neurons
    groups = rng.permutation(n).reshape(16, -1)
    out.mkdir()
    for layer in range(manifest.n_layers):
        mag = rng.random((tokens, n)).astype(np.float16) * 0.1
        for t in range(tokens):
            for g in rng.choice(16, 5, replace=False):
                mag[t, groups[g]] += 1.0
        np.save(out / f"mag_{layer:03d}.npy", mag)
    (out / "calibration.json").write_text(json.dumps({
        "n_tokens": tokens, "seq_len": seq_len, "n_layers": manifest.n_layers,
        "n_neurons": [e.n_neurons for e in manifest.layers]}))
    return out, groups


@pytest.fixture(scope="module")
def placed(tiny_dirs, tmp_path_factory):
    """(original flash dir, its placed copy (coact), calibration dir, groups)."""
    _, flash = tiny_dirs("qwen2")
    root = tmp_path_factory.mktemp("placed")
    copy = shutil.copytree(flash, root / "flash")
    calib, groups = fake_calibration(root / "calib", read_manifest(flash))
    place(copy, calib, "coact", keep=0.3)
    return flash, copy, calib, groups


def test_placed_dir_is_a_permutation_and_reads_the_same_neurons(placed):
    flash, copy, _, _ = placed
    manifest = read_manifest(copy)
    assert manifest.format_version == 2 and manifest.placement["method"] == "coact"
    order = manifest.order(0)
    assert not np.array_equal(order, np.arange(order.size))
    assert np.array_equal(np.sort(order), np.arange(order.size))
    assert sorted(p.name for p in (copy / "ffn").iterdir()) == sorted(
        e.file.split("/")[-1] for e in manifest.layers)  # old files gone, no temp files left
    ids = np.array([1, 4, 9, 60, 61, 127])
    with NeuronStore(flash, read_manifest(flash)) as a, NeuronStore(copy, manifest) as b:
        assert np.array_equal(a.read(0, ids)[0], b.read(0, ids)[0])
        got = np.concatenate([rows for _, rows, _ in b.iter_layer(1, 50)])
        ids_in_file_order = np.concatenate([i for i, _, _ in b.iter_layer(1, 50)])
        assert np.array_equal(got, a.read(1, np.arange(128))[0][ids_in_file_order])
    text = (copy / "manifest.json").read_text()
    assert len(text) < 4 * len((flash / "manifest.json").read_text())  # compact permutations


@pytest.mark.parametrize("kwargs", [dict(), dict(oracle_rule="top", keep=0.5, window=2),
                                    dict(oracle_rule="top", keep=0.5, pin_hot=0.25,
                                         dram_budget=None)])
def test_placement_does_not_change_generated_tokens(flash_load, placed, kwargs):
    flash, copy, _, _ = placed
    dense, tokenizer = load_dense(flash)
    want = greedy(dense, tokenizer)
    assert greedy(load_dense(copy)[0], tokenizer) == want
    outs = []
    unpinned = {k: v for k, v in kwargs.items() if k != "pin_hot"}  # no hot lists in flash
    for d, options in ((flash, unpinned), (copy, unpinned), (copy, kwargs)):
        model, _ = flash_load(d, **options)
        outs.append(greedy(model, tokenizer))
        assert model.flash.stats.settings["pinned"] == (32 if "pin_hot" in options else 0)
    if not kwargs.get("oracle_rule"):
        assert outs[0] == want
    assert outs[1] == outs[0] and outs[2] == outs[0]


def test_coact_order_keeps_groups_together(placed):
    _, copy, _, groups = placed
    position = np.argsort(read_manifest(copy).order(0))
    spread = [np.ptp(position[g]) for g in groups]  # a group of 8 placed within ~8 slots
    assert np.median(spread) < 16


def test_placement_cuts_modelled_reads(placed):
    flash, _, calib, _ = placed
    manifest = read_manifest(flash)
    mag = np.load(calib / "mag_000.npy")
    active = np.zeros(mag.shape, dtype=bool)
    np.put_along_axis(active, np.argsort(-mag, axis=1)[:, :38], True, axis=1)
    new = new_sets(active[128:], window=1)
    stride = manifest.layers[0].stride
    base = evaluate(np.arange(128), new, stride, SLOW_READS, "neuron").per_token()
    ordered = evaluate(coact_order(active[:128]), new, stride, SLOW_READS, "cost").per_token()
    assert base["reads"] == pytest.approx(base["needed"] / stride)
    assert ordered["ms"] < base["ms"] / 2


def test_bad_permutation_is_rejected(placed, tmp_path):
    _, copy, _, _ = placed
    bad = shutil.copytree(copy, tmp_path / "bad")
    data = json.loads((bad / "manifest.json").read_text())
    order = decode_ids(data["layers"][1]["order"], "test")
    order[0] = order[1]
    data["layers"][1]["order"] = encode_ids(order)
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="layer 1 order repeats neuron ids.*mlx-flash place"):
        read_manifest(bad)
    data["layers"][1]["order"] = encode_ids(np.arange(127))
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="not a permutation"):
        read_manifest(bad)
    data["layers"][1]["order"] = "not base64!"
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="manifest.json: .*order is not base64"):
        read_manifest(bad)
    data["layers"][1]["order"] = encode_ids(np.arange(128))
    data["format_version"] = 1
    (bad / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="format_version is 1"):
        read_manifest(bad)


def test_unplaced_manifest_keeps_format_1(tiny_dirs):
    _, flash = tiny_dirs("qwen2")
    text = (flash / "manifest.json").read_text()
    assert '"format_version": 1' in text and "order" not in text and "placement" not in text
    assert read_manifest(flash).to_json() == text


def test_place_rejects_a_calibration_of_another_model(placed, tmp_path):
    flash, _, _, _ = placed
    copy = shutil.copytree(flash, tmp_path / "m")
    calib = tmp_path / "c"
    calib.mkdir()
    (calib / "calibration.json").write_text(json.dumps({"n_layers": 3, "n_neurons": [7] * 3}))
    with pytest.raises(ValueError, match="calibration.json.*record calibration on this model"):
        place(copy, calib)
    with pytest.raises(FileNotFoundError, match="calibration.json is missing"):
        place(copy, tmp_path)


# ---------------------------------------------------------------- pinning


def test_pinned_neurons_are_never_evicted():
    cache = NeuronCache(20, 8, 1, 4, mx.float32, window=1)
    cache.pin(np.array([3, 7]))
    for ids in ([1, 2, 3], [4, 5, 6, 9, 10, 11], [12, 7], list(range(12, 20))):
        plan = cache.advance(np.array(ids))
        assert set(cache.neuron_of[:2]) == {3, 7}
        assert plan.truncated == max(0, len([i for i in ids if i not in (3, 7)]) - 6)
    cache.reset()
    assert cache.n == 2 and cache.slot_of[3] == 0 and cache.slot_of[7] == 1
    with pytest.raises(ValueError, match="before the first token"):
        cache.pin(np.array([1]))


def test_pin_needs_hot_lists(tiny_dirs):
    _, flash = tiny_dirs("qwen2")
    with pytest.raises(ValueError, match="mlx-flash place"):
        load(flash, pin_hot=0.25)


# ---------------------------------------------------------------- the benchmark's I/O modes


def test_io_contenders(tmp_path):
    names = list(bench_contenders.IO_ABLATIONS)
    by = {c.name: c for c in bench_contenders.build_contenders(names, False, 0.3, None, "no",
                                                               None)}
    assert by["flash-per-neuron"].options["read_planner"] == "neuron"
    assert by["flash-runs"].options["read_planner"] == "runs"
    assert by["flash-placed"].skip and by["flash-placed-pinned"].skip
    by = {c.name: c for c in bench_contenders.build_contenders(names, False, 0.3, None, "no",
                                                               tmp_path)}
    assert by["flash-placed"].options["model_dir"] == str(tmp_path)
    assert by["flash-placed-pinned"].options["pin_hot"] == 0.25


def test_io_replay_reads_what_the_cache_misses(placed, monkeypatch):
    flash, copy, calib, _ = placed
    # shared machine: no dropping of the page cache in tests
    monkeypatch.setattr(bench_replay, "drop_page_cache", lambda: False)
    sets = bench_replay.replay_sets(calib, read_manifest(flash), 0.3, 8)
    stride = read_manifest(flash).layers[0].stride
    one = bench_replay.replay_io(flash, sets, "neuron", 1, 128)
    assert one["reads"] == pytest.approx(one["needed"] / stride)
    pinned = bench_replay.replay_io(copy, sets, "cost", 1, 128, pin=32)
    assert pinned["needed"] < one["needed"] and pinned["reads"] < one["reads"]


def test_calibrate_measures_a_scratch_file_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(disk, "drop_page_cache", lambda: False)  # shared machine: not in tests
    seen = []
    model = offline_calibrate_disk.calibrate(tmp_path, seconds=0.005, scratch_bytes=8 * 2**20,
                           progress=seen.append)
    assert len(seen) == offline_calibrate_disk.points() and not list(tmp_path.iterdir())
    assert model.device == runtime_disk.device_of(tmp_path) and model.latency() > 0
    assert runtime_disk.CostModel.from_json(model.to_json(), "x") == model
    with pytest.raises(FileNotFoundError, match="not a directory"):
        offline_calibrate_disk.calibrate(tmp_path / "missing")
