"""Read faults and concurrent callers leave a loaded flash model exactly as correct as before.

Faults are injected under the store (os.preadv): EIO at the k-th read, a read that comes back
short, a bundle file truncated then restored in place. After each, the next greedy generation
must equal load_dense's. Two threads generating on one model each get their single-threaded
reference. The mmap store raises StoreReadError on a truncated file instead of dying of SIGBUS.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate

import mlx_flash.accel.build as accel_build
from mlx_flash.format.manifest import read_manifest
from mlx_flash.runtime.loader import load_dense
from mlx_flash.runtime.pinning import pin_hot
from mlx_flash.runtime.store import NeuronStore, ReadAhead, StoreReadError

PROMPT = [5, 9, 17, 33, 65, 129, 7, 8]  # > max_sparse_tokens below: the prefill streams
MODELS = {"gated": ("qwen2", "all"), "plain": ("nemotron", "nonzero")}  # arch, oracle rule


def greedy(model, tokenizer, prompt=PROMPT, n=3) -> str:
    return generate(model, tokenizer, prompt, max_tokens=n)


class FlakyDisk:
    """os.preadv that fails at the calls numbered in `fail_at` (1-based): with EIO, or as a
    read that returns 0 bytes (the file "ended")."""

    def __init__(self, real, how: str):
        self.real, self.how, self.calls, self.fail_at = real, how, 0, set()
        self._lock = threading.Lock()

    def __call__(self, fd, buffers, offset):
        with self._lock:
            self.calls += 1
            fail = self.calls in self.fail_at
        if fail and self.how == "eio":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        if fail:
            return 0
        return self.real(fd, buffers, offset)


def fast_cpu_or_skip(fast_cpu: bool) -> None:
    if fast_cpu and accel_build.unavailable_reason():
        pytest.skip(f"CPU kernels: {accel_build.unavailable_reason()}")


def load_pair(flash_load, tiny_dirs, kind: str, fast_cpu: bool, copy_to: Path | None = None,
              **options):
    """(flash model, tokenizer, reference tokens) for a tiny model of `kind`; copy_to: load
    a copy of its dir made there (for tests that damage the files)."""
    arch, rule = MODELS[kind]
    _, flash_dir = tiny_dirs(arch, "float16")
    if copy_to is not None:
        flash_dir = Path(shutil.copytree(flash_dir, copy_to / "flash"))
    dense, tokenizer = load_dense(flash_dir, dtype="float32")
    model, _ = flash_load(flash_dir, oracle_rule=rule, fast_cpu=fast_cpu,
                          dtype=None if fast_cpu else "float32", max_sparse_tokens=4,
                          window=2, **options)
    model.flash.config.prefill_chunk = 32  # several streamed chunks per layer
    return model, tokenizer, greedy(dense, tokenizer)


def failed_generation(model, tokenizer, reference: str) -> bool:
    """Generate under a fault: it raises a StoreReadError naming the file and the offset, or
    (the fault hit a wrong read-ahead guess, nothing needed) it is correct. True if it raised."""
    try:
        out = greedy(model, tokenizer)
    except StoreReadError as e:
        assert ".bin" in str(e) and "offset" in str(e), e
        return True
    assert out == reference
    return False


@pytest.mark.parametrize("how", ["eio", "short"])
@pytest.mark.parametrize("budget", [False, True])
@pytest.mark.parametrize("fast_cpu", [False, True])
@pytest.mark.parametrize("kind", list(MODELS))
def test_a_failed_read_leaves_the_model_correct(flash_load, tiny_dirs, monkeypatch, request,
                                                kind, fast_cpu, budget, how):
    """A fault at every read of a generation in turn (window, streamed prefill and overflow,
    read-ahead, the oracle's): the next generation equals the reference each time."""
    fast_cpu_or_skip(fast_cpu)
    if budget:
        request.getfixturevalue("caches_of_three_neurons")
    model, tokenizer, reference = load_pair(flash_load, tiny_dirs, kind, fast_cpu)
    fault_every_read(model, tokenizer, reference, monkeypatch, how)


@pytest.mark.parametrize("fast_cpu", [False, True])
def test_a_failed_read_keeps_the_pinned_neurons(flash_load, tiny_dirs, monkeypatch, fast_cpu):
    fast_cpu_or_skip(fast_cpu)
    model, tokenizer, reference = load_pair(flash_load, tiny_dirs, "plain", fast_cpu)
    give_hot_lists(model)
    assert pin_hot(model, 16) == 16
    fault_every_read(model, tokenizer, reference, monkeypatch, "eio")
    assert all(layer.mlp.cache.pinned == 16 for layer in model.layers)


def fault_every_read(model, tokenizer, reference: str, monkeypatch, how: str) -> None:
    """For k = 1, 2, ... up to the reads of a first generation: a generation with a fault at
    its k-th read, then one without, which must equal `reference`. Most faults that a
    generation reaches raise (a model whose caches hold every neuron reads nothing at all
    once warm: those faults are never reached)."""
    disk = FlakyDisk(os.preadv, how)
    monkeypatch.setattr(os, "preadv", disk)
    assert greedy(model, tokenizer) == reference
    reads = disk.calls  # of a first generation, the most
    raised = reached = 0
    for k in range(1, reads + 1):
        if k % 2:  # every other fault hits a model as just loaded: the window is seeded
            forget_every_neuron(model)
        start = disk.calls
        disk.fail_at = {start + k}
        raised += failed_generation(model, tokenizer, reference)
        reached += disk.calls >= start + k
        disk.fail_at = set()
        assert greedy(model, tokenizer) == reference, f"after a fault at read {k} of {reads}"
    # the odd k fault a model as just loaded, which reads as the first generation did
    assert reached >= (reads - 1) // 2 and raised > reached // 2


def forget_every_neuron(model) -> None:
    """Back to the caches of a model just loaded (and pinned): no unpinned neuron cached,
    their rows zeroed."""
    for layer in model.layers:
        cache = layer.mlp.cache
        cache.reset()
        for buffer in cache.buffers.values():  # numpy or MLX: both assign in place
            buffer[:, cache.pinned:] = 0
            if isinstance(buffer, mx.array):
                mx.eval(buffer)


def give_hot_lists(model) -> None:
    """Every neuron "hot", most active first by id, as a placed dir's manifest would say."""
    for entry in model.flash.manifest.layers:
        entry.hot = np.arange(entry.n_neurons)


SHORT = PROMPT[:4]  # <= max_sparse_tokens: the prompt goes the window path, not the stream


def truncate_and_restore(path: Path, model, tokenizer, references: dict) -> None:
    """Truncate `path` in place under a model as just loaded; each prompt fails (twice: still
    an error, not a wrong answer); write the file back in place; each prompt is right."""
    data = path.read_bytes()
    forget_every_neuron(model)
    with open(path, "r+b") as f:
        f.truncate(len(data) // 3)
    for prompt in (SHORT, PROMPT, SHORT):
        with pytest.raises(StoreReadError, match=path.name):
            greedy(model, tokenizer, prompt)
    with open(path, "r+b") as f:
        f.write(data)
    for prompt in (SHORT, PROMPT):
        assert greedy(model, tokenizer, prompt) == references[len(prompt)], path.name


@pytest.mark.parametrize("budget", [False, True])
@pytest.mark.parametrize("fast_cpu", [False, True])
@pytest.mark.parametrize("kind", list(MODELS))
def test_a_truncated_then_restored_file_leaves_the_model_correct(
        flash_load, tiny_dirs, tmp_path, request, kind, fast_cpu, budget):
    fast_cpu_or_skip(fast_cpu)
    if budget:
        request.getfixturevalue("caches_of_three_neurons")
    model, tokenizer, reference = load_pair(flash_load, tiny_dirs, kind, fast_cpu, tmp_path)
    dense, _ = load_dense(model.flash.store.root, dtype="float32")
    references = {len(PROMPT): reference, len(SHORT): greedy(dense, tokenizer, SHORT)}
    for layer in range(model.flash.manifest.n_layers):
        truncate_and_restore(model.flash.store.paths[layer], model, tokenizer, references)


def test_read_ahead_keeps_no_guess_read_beside_a_failed_read(tiny_dirs, monkeypatch):
    """Two chunks announced, both reads fail: the first is asked for and raises; the second,
    asked for once the disk is well again, is read again (not the failure kept from before),
    and every buffer comes back."""
    _, flash_dir = tiny_dirs("qwen2", "float16")
    with NeuronStore(flash_dir, read_manifest(flash_dir), threads=1) as store:
        ahead = ReadAhead(store, depth=2, chunk=16)
        first, second = np.arange(16), np.arange(16, 32)
        expected, _ = store.read(0, second, planned=False)  # (checks the file's blocks)
        disk = FlakyDisk(os.preadv, "eio")
        monkeypatch.setattr(os, "preadv", disk)
        disk.fail_at = {1, 2}
        ahead.expect(0, first, planned=False)
        ahead.expect(0, second, planned=False)
        with pytest.raises(StoreReadError, match="offset 0"):
            ahead.read(0, first, planned=False)
        # The disk is well again. Whether the reader had already failed on the second chunk
        # or had not got to it yet (thread timing), its read must not come back as a failure.
        disk.fail_at = set()
        rows, _ = ahead.read(0, second, planned=False)
        assert np.array_equal(rows, expected)
        assert len(ahead._free) == ahead.depth + 1  # all back (`rows` was read directly)
        ahead.close()


@pytest.mark.parametrize("how", ["eio", "short"])
@pytest.mark.parametrize("fast_cpu", [False, True])
def test_a_failed_pin_leaves_no_neuron_pinned(flash_load, tiny_dirs, monkeypatch, fast_cpu,
                                              how):
    """A fault while pin_hot reads the second layer's hot rows: no layer keeps a pin and the
    caches stay empty, so the next try works."""
    fast_cpu_or_skip(fast_cpu)
    model, tokenizer, reference = load_pair(flash_load, tiny_dirs, "gated", fast_cpu)
    give_hot_lists(model)
    disk = FlakyDisk(os.preadv, how)
    monkeypatch.setattr(os, "preadv", disk)
    disk.fail_at = {2}  # the second layer's read
    with pytest.raises(StoreReadError):
        pin_hot(model, 8)
    assert all(layer.mlp.cache.n == layer.mlp.cache.pinned == 0 for layer in model.layers)
    assert pin_hot(model, 8) == 8
    assert greedy(model, tokenizer) == reference


@pytest.mark.parametrize("budget", [False, True])
@pytest.mark.parametrize("fast_cpu", [False, True])
@pytest.mark.parametrize("kind", list(MODELS))
def test_two_threads_each_get_their_reference(flash_load, tiny_dirs, request, kind, fast_cpu,
                                              budget):
    """Two threads generating greedily on one fresh model: each output is its prompt's
    single-threaded reference (the model serializes its forward passes)."""
    fast_cpu_or_skip(fast_cpu)
    if budget:
        request.getfixturevalue("caches_of_three_neurons")
    model, tokenizer, _ = load_pair(flash_load, tiny_dirs, kind, fast_cpu)
    arch, _ = MODELS[kind]
    dense, _ = load_dense(tiny_dirs(arch, "float16")[1], dtype="float32")
    prompts = [PROMPT, [11, 4, 3, 90, 200, 6, 31, 77, 15]]
    references = [greedy(dense, tokenizer, p, n=12) for p in prompts]
    outputs: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def worker(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                outputs[i].append(greedy(model, tokenizer, prompts[i], n=12))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert outputs == {i: [references[i]] * 3 for i in range(2)}


MMAP_TRUNCATION = """
import sys
from pathlib import Path
from mlx_lm import generate
from mlx_flash import load
from mlx_flash.format.manifest import read_manifest
from mlx_flash.runtime.store import NeuronStore, ReadAhead, StoreReadError

model, tokenizer = load(sys.argv[1], store_mode="mmap", fast_cpu=False, dtype="float32",
                        max_sparse_tokens=4, oracle_rule="all")
prompt = [5, 9, 17, 33, 65, 129, 7, 8]
reference = generate(model, tokenizer, prompt, max_tokens=4)
path = model.flash.store.paths[1]
data = path.read_bytes()
with open(path, "r+b") as f:
    f.truncate(len(data) // 3)
for layer in model.layers:  # warm caches would serve the prompt without reading the file
    layer.mlp.cache.reset()
try:
    generate(model, tokenizer, prompt, max_tokens=4)
except StoreReadError as e:
    print("raised:", e)
with open(path, "r+b") as f:
    f.write(data)
print("same:", generate(model, tokenizer, prompt, max_tokens=4) == reference)
model.flash.close()
"""


def test_mmap_store_raises_on_a_truncated_file(tiny_dirs, tmp_path):
    """In a subprocess: a SIGBUS would kill pytest."""
    _, flash_dir = tiny_dirs("qwen2", "float16")
    copy = shutil.copytree(flash_dir, tmp_path / "flash")
    done = subprocess.run([sys.executable, "-c", MMAP_TRUNCATION, str(copy)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    lines = done.stdout.splitlines()
    assert lines[0].startswith("raised:") and "layer_001" in lines[0] and "offset" in lines[0]
    assert lines[1] == "same: True"
