"""NeuronStore: every read mode returns the file's bytes; errors name file and offset."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import mlx_flash.format.checksums as checksums
from mlx_flash.format.checksums import ChecksumError
from mlx_flash.format.manifest import add_block_checksums, read_manifest
from mlx_flash.runtime.planner import spans_across, split_spans
from mlx_flash.runtime.store import NeuronStore, ReadAhead, StoreReadError, supports_direct


@pytest.fixture
def flash(tiny_dirs):
    return tiny_dirs("starcoder2")[1]


def file_rows(flash, manifest, layer):
    entry = manifest.layers[layer]
    return np.fromfile(flash / entry.file, dtype=np.uint8).reshape(entry.n_neurons, entry.stride)


def test_spans_coalesce_adjacent_ids():
    def spans(ids, gap):
        starts, stops = spans_across(ids, gap)
        return list(zip(starts.tolist(), stops.tolist(), strict=True))

    ids = np.array([1, 2, 3, 7, 9, 10])
    assert spans(ids, 0) == [(1, 4), (7, 8), (9, 11)]
    assert spans(ids, 1) == [(1, 4), (7, 11)]
    assert spans(np.array([], dtype=np.int64), 0) == []
    assert split_spans([(0, 5)], 2) == [(0, 2), (2, 4), (4, 5)]


@pytest.mark.parametrize("kwargs", [dict(), dict(threads=1), dict(direct=True),
                                    dict(mode="mmap"), dict(max_gap=3), dict(max_read=256)])
def test_reads_equal_file_bytes(flash, kwargs):
    manifest = read_manifest(flash)
    want = file_rows(flash, manifest, 1)
    rng = np.random.default_rng(0)
    with NeuronStore(flash, manifest, **kwargs) as store:
        for size in (0, 1, 5, 64, manifest.layers[1].n_neurons):
            ids = rng.choice(manifest.layers[1].n_neurons, size, replace=False)
            rows, stats = store.read(1, ids)
            assert np.array_equal(rows, want[np.sort(ids)])
            assert stats.neurons == size
    assert store.stats.neurons > 0


def test_coalescing_counts_reads_and_bytes(flash):
    manifest = read_manifest(flash)
    stride = manifest.layers[0].stride
    with NeuronStore(flash, manifest) as store:
        _, stats = store.read(0, np.array([4, 5, 6, 20]))
    assert stats.reads == 2 and stats.bytes == 4 * stride


def test_direct_reads_whole_pages(flash):
    manifest = read_manifest(flash)
    with NeuronStore(flash, manifest, direct=True) as store:
        _, stats = store.read(0, np.array([3]))
    assert stats.bytes % 4096 == 0 or stats.bytes == manifest.layers[0].size


def test_out_of_range_ids(flash):
    manifest = read_manifest(flash)
    with NeuronStore(flash, manifest) as store, pytest.raises(IndexError, match="out of range"):
        store.read(0, np.array([manifest.layers[0].n_neurons]))


def test_short_read_names_file_and_offset(tiny_dirs, tmp_path):
    import shutil

    flash = shutil.copytree(tiny_dirs("qwen2")[1], tmp_path / "copy")
    manifest = read_manifest(flash)
    with NeuronStore(flash, manifest) as store:
        path = flash / manifest.layers[0].file
        with open(path, "r+b") as f:
            f.truncate(manifest.layers[0].stride * 10)
        with pytest.raises(StoreReadError, match=r"layer_000.bin at offset \d+"):
            store.read(0, np.array([50]))


def test_bad_arguments(flash):
    manifest = read_manifest(flash)
    with pytest.raises(ValueError, match="mode"):
        NeuronStore(flash, manifest, mode="carrier-pigeon")
    with pytest.raises(ValueError, match="threads"):
        NeuronStore(flash, manifest, threads=0)


def test_read_into_a_reused_buffer(flash):
    manifest = read_manifest(flash)
    want = file_rows(flash, manifest, 0)
    stride = manifest.layers[0].stride
    buf = np.zeros(10 * stride, dtype=np.uint8)
    with NeuronStore(flash, manifest, direct=True) as store:
        for ids in (np.array([7, 2, 9]), np.arange(10)):
            rows, _ = store.read(0, ids, buf)
            assert np.shares_memory(rows, buf)
            assert np.array_equal(rows, want[np.sort(ids)])
        with pytest.raises(ValueError, match="at least"):
            store.read(0, np.arange(11), buf)


def test_read_ahead_serves_announced_chunks_and_counts_wrong_guesses(flash):
    manifest = read_manifest(flash)
    want = [file_rows(flash, manifest, i) for i in (0, 1)]
    a, b, c = np.arange(0, 4), np.arange(4, 8), np.arange(8, 12)
    with NeuronStore(flash, manifest) as store:
        ahead = ReadAhead(store, depth=2, chunk=4)
        ahead.expect(0, a)
        ahead.expect(0, b)
        ahead.expect(0, c)  # over the depth: not announced
        rows, _ = ahead.read(0, a)
        assert np.array_equal(rows, want[0][a])
        first = rows.__array_interface__["data"][0]
        rows, _ = ahead.read(0, b)  # the rows of `a` are given back to the pool here
        assert np.array_equal(rows, want[0][b])
        assert ahead.take_wasted().bytes == 0
        ahead.expect(1, a)  # a wrong guess: layer 0's `c` is read next
        ahead._queue[-1][3].result()  # read already (a guess not yet started is cancelled)
        ahead.expect(0, c)
        rows, _ = ahead.read(0, c)
        assert np.array_equal(rows, want[0][c])
        wasted = ahead.take_wasted()
        assert wasted.neurons == 4 and wasted.bytes == 4 * manifest.layers[1].stride
        ahead.expect(1, b)
        ahead._queue[-1][3].result()
        rows, _ = ahead.read(1, c)  # never announced: read directly, the guess dropped
        assert np.array_equal(rows, want[1][c])
        assert ahead.take_wasted().neurons == 4
        buffers = {first} | {buf.__array_interface__["data"][0] for buf in ahead._free}
        assert len(buffers) == 3  # depth + 1 buffers, reused: no new ones were made
        ahead.close()


def test_supports_direct(flash, tmp_path):
    manifest = read_manifest(flash)
    assert supports_direct(flash / manifest.layers[0].file) == hasattr(os, "O_DIRECT")
    assert not supports_direct(tmp_path / "missing.bin")


def test_unplanned_reads_are_one_span_and_must_be_contiguous(flash):
    manifest = read_manifest(flash)
    want = file_rows(flash, manifest, 0)
    with NeuronStore(flash, manifest, planner="neuron") as store:
        piece = store.layer_chunks(0, 50)[1]
        rows, stats = store.read(0, piece, planned=False)
        assert stats.reads == 1 and np.array_equal(rows, want[piece])
        assert store.read(0, piece)[1].reads == piece.size  # planned: one read per neuron
        with pytest.raises(ValueError, match="one contiguous range"):
            store.read(0, np.array([1, 2, 5]), planned=False)


@pytest.fixture
def damaged(flash, tmp_path):
    """A copy of the tiny dir with 4 KiB checksum blocks and block 3 of layer 1 damaged:
    (dir, bad ids: the neurons whose bundle touches that block, good ids: the others)."""
    root = shutil.copytree(flash, tmp_path / "flash")
    manifest = add_block_checksums(root, read_manifest(root), block_size=4096)
    entry = manifest.layers[1]
    path = root / entry.file
    data = bytearray(path.read_bytes())
    data[3 * 4096 + 100:3 * 4096 + 107] = bytes(7)  # 7 bytes in the middle, same size
    path.write_bytes(bytes(data))
    starts = np.arange(entry.n_neurons) * entry.stride
    bad = (starts < 4 * 4096) & (starts + entry.stride > 3 * 4096)
    return root, np.flatnonzero(bad), np.flatnonzero(~bad)


@pytest.mark.parametrize("kwargs", [dict(), dict(direct=True), dict(mode="mmap"),
                                    dict(max_gap=50)])
def test_a_damaged_block_is_refused_and_the_rest_read(damaged, kwargs):
    root, bad, good = damaged
    manifest = read_manifest(root)
    want = file_rows(root, manifest, 1)
    path = root / manifest.layers[1].file
    with NeuronStore(root, manifest, **kwargs) as store:
        rows, _ = store.read(1, good[::3])
        assert np.array_equal(rows, want[good[::3]])
        out = np.full(manifest.layers[1].n_neurons * manifest.layers[1].stride, 7, np.uint8)
        for ids in (bad[:1], np.concatenate([good[:5], bad[-1:]])):
            with pytest.raises(ChecksumError, match=rf"{path}: checksum mismatch in block 3 "
                                                    r"\(bytes 12288-16384\).*re-convert"):
                store.read(1, ids, out)
            assert (out == 7).all()  # nothing of a refused read is handed out
        with pytest.raises(ChecksumError, match="block 3"):
            list(store.iter_layer(1, 1000))
        assert np.array_equal(store.read(1, good)[0], want[good])  # still answers the rest
        assert np.array_equal(store.read(0, np.arange(20))[0], file_rows(root, manifest, 0)[:20])


def test_read_ahead_refuses_a_damaged_block_but_drops_a_damaged_guess(damaged):
    root, bad, good = damaged
    manifest = read_manifest(root)
    with NeuronStore(root, manifest) as store:
        ahead = ReadAhead(store, depth=2, chunk=manifest.layers[1].n_neurons)
        ahead.expect(1, bad)
        with pytest.raises(ChecksumError, match="block 3"):
            ahead.read(1, bad)
        ahead.expect(1, bad)  # a wrong guess that hits the damage: dropped, not raised
        ahead._queue[-1][3].exception()
        rows, _ = ahead.read(1, good[:4])
        assert np.array_equal(rows, file_rows(root, manifest, 1)[good[:4]])
        ahead.close()


@pytest.mark.parametrize("kwargs", [dict(), dict(direct=True), dict(mode="mmap")])
def test_each_block_is_hashed_once_per_store(flash, tmp_path, monkeypatch, kwargs):
    root = shutil.copytree(flash, tmp_path / "flash")
    manifest = add_block_checksums(root, read_manifest(root), block_size=4096)
    calls = []
    real = checksums.block_sum
    monkeypatch.setattr(checksums, "block_sum", lambda data: calls.append(1) or real(data))
    n_blocks = -(-manifest.layers[0].size // 4096)
    with NeuronStore(root, manifest, **kwargs) as store:
        ids = np.array([0, 1, 2])  # all in block 0
        store.read(0, ids)
        assert len(calls) == 1 and store.verified[0].tolist() == [True] + [False] * (n_blocks - 1)
        store.read(0, ids)
        store.read(0, np.array([1]))
        assert len(calls) == 1  # verified: a second read does not hash again
        for _ in store.iter_layer(0, 40):
            pass
        assert len(calls) == n_blocks == store.blocks_checked and store.verified[0].all()
        store.read(0, np.arange(manifest.layers[0].n_neurons))
        assert len(calls) == n_blocks


@pytest.mark.parametrize("kwargs", [dict(), dict(direct=True), dict(mode="mmap")])
def test_a_streamed_layer_is_checked_from_the_rows_it_read(flash, tmp_path, kwargs):
    root = shutil.copytree(flash, tmp_path / "flash")
    manifest = add_block_checksums(root, read_manifest(root), block_size=4096)
    n = manifest.layers[0].n_neurons
    with NeuronStore(root, manifest, **kwargs) as store:
        reads = []
        real = store._check_block
        store._check_block = lambda job: reads.append(job) or real(job)
        (_, rows, _), = store.iter_layer(0, n)  # the whole layer: every block inside the read
        assert reads == [] and store.verified[0].all()
        assert np.array_equal(rows, file_rows(root, manifest, 0))
        store.read(1, np.arange(10, 40))  # edge blocks are read for their check, inner ones not
        stride = manifest.layers[1].stride
        edges = {10 * stride // 4096, (40 * stride - 1) // 4096}
        assert {b for _, b in reads} == edges and len(reads) == 2


@pytest.mark.parametrize("kwargs", [dict(), dict(direct=True), dict(mode="mmap")])
def test_streamed_chunks_snap_to_whole_bundle_blocks_so_no_block_is_read_twice(flash, tmp_path,
                                                                                 kwargs):
    """Blocks of whole bundles (what convert writes): chunks are rounded down to whole blocks,
    so streaming a layer in chunks verifies every block from the rows it read."""
    root = shutil.copytree(flash, tmp_path / "flash")
    stride = read_manifest(root).layers[0].stride
    manifest = add_block_checksums(root, read_manifest(root), block_size=4 * stride)
    n = manifest.layers[0].n_neurons
    with NeuronStore(root, manifest, **kwargs) as store:
        assert store.whole_blocks(0, 10) == 8 and store.whole_blocks(0, 3) == 3
        assert [c.size for c in store.layer_chunks(0, 10)][:2] == [8, 8]
        reads = []
        real = store._check_block
        store._check_block = lambda job: reads.append(job) or real(job)
        chunks = list(store.iter_layer(0, 10))
        assert [ids.size for ids, _, _ in chunks[:2]] == [8, 8]
        assert reads == [] and store.verified[0].all()
        rows = np.concatenate([r for _, r, _ in chunks])
        assert np.array_equal(rows, file_rows(root, manifest, 0)) and len(rows) == n
