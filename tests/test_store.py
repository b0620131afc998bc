"""NeuronStore: every read mode returns the file's bytes; errors name file and offset."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_flash.format import read_manifest
from mlx_flash.store import NeuronStore, StoreReadError, runs_of, split_runs


@pytest.fixture
def flash(tiny_dirs):
    return tiny_dirs("starcoder2")[1]


def file_rows(flash, manifest, layer):
    entry = manifest.layers[layer]
    return np.fromfile(flash / entry.file, dtype=np.uint8).reshape(entry.n_neurons, entry.stride)


def test_runs_coalesce_adjacent_ids():
    ids = np.array([1, 2, 3, 7, 9, 10])
    assert runs_of(ids) == [(1, 4), (7, 8), (9, 11)]
    assert runs_of(ids, max_gap=1) == [(1, 4), (7, 11)]
    assert runs_of(np.array([], dtype=np.int64)) == []
    assert split_runs([(0, 5)], 2) == [(0, 2), (2, 4), (4, 5)]


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
