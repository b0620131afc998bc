"""Neuron placement: store co-activated neurons next to each other, and pin the hot ones.

The disk is bound by the read count (`runtime/disk.py`), so the neurons a token needs should sit
in few spans of the bundle file. From a calibration recording (`calibration.record_activations`:
per layer `mag_NNN.npy`, (N tokens, n neurons) |activation|) a neuron is "active" for a token
when it is in the token's top `keep` fraction (the oracle's rule). Orders:

  hot      most often active first (PowerInfer's hot/cold split, as a file order)
  coact    Ripple's (arXiv 2410.19274) co-activation graph ordering: edge weight = how often two
           neurons are active together; a greedy maximum-weight path cover (heaviest edges
           first, each neuron at most two neighbours, no cycles) chains neurons that fire
           together; the chains are laid out hottest first, so coact is also roughly hot-first

`place` rewrites each layer's bundle file in the new order and records the permutation in the
manifest (`LayerEntry.order`, format version 2): the store maps original ids to positions, so
predictors, caches and everything above the store keep speaking original ids. Crash safety: new
files get new names (temp name, fsync, rename), the manifest replace is the commit point, the
old files are deleted after it; an interrupted `place` leaves the old dir intact.

`evaluate` replays held-out tokens through an order and the read planner.

Hot neurons: `LayerEntry.hot` lists each layer's neurons by calibration frequency;
`runtime/pinning.pin_hot` loads the first `count` of them into the neuron caches for the whole
run (never evicted).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..format.checksums import bundle_block_size, file_checks
from ..format.manifest import (
    MANIFEST,
    PLACED_FORMAT_VERSION,
    Manifest,
    read_layer_rows,
    read_manifest,
)
from ..format.storage import atomic_write
from ..runtime.disk import CostModel
from ..runtime.planner import plan_reads, span_bytes
from .space import check_free, is_full, space_error

METHODS = ("hot", "coact", "identity")


Progress = Callable[[str], None]


def calibration_mags(calibration: Path, manifest: Manifest, layer: int) -> np.ndarray:
    """One layer's recorded |activation|: (N, n) float16, memory-mapped."""
    info_path = calibration / "calibration.json"
    if not info_path.exists():
        raise FileNotFoundError(f"{info_path} is missing: {calibration} is not a finished "
                                "calibration recording (make one with `mlx-flash "
                                "train-predictors --calibration-dir DIR`)")
    info = json.loads(info_path.read_text())
    n = manifest.layers[layer].n_neurons
    if info.get("n_layers") != manifest.n_layers or info.get("n_neurons", [None])[layer] != n:
        raise ValueError(f"{info_path}: recorded for {info.get('n_layers')} layers x "
                         f"{info.get('n_neurons', ['?'])[0]} neurons, but the model has "
                         f"{manifest.n_layers} x {n}: record calibration on this model")
    mag = np.load(calibration / f"mag_{layer:03d}.npy", mmap_mode="r")
    if mag.ndim != 2 or mag.shape[1] != n:
        raise ValueError(f"{calibration / f'mag_{layer:03d}.npy'}: shape {mag.shape}, expected "
                         f"(tokens, {n}); record the calibration again")
    return mag


def active_sets(mag: np.ndarray, keep: float) -> np.ndarray:
    """(N, n) bool: each token's top `keep` fraction of neurons by |activation|."""
    n = mag.shape[1]
    k = max(1, int(np.ceil(keep * n)))
    out = np.zeros(mag.shape, dtype=bool)
    for lo in range(0, mag.shape[0], 512):
        block = np.asarray(mag[lo:lo + 512], dtype=np.float32)
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        np.put_along_axis(out[lo:lo + 512], top, True, axis=1)
    return out


def split_holdout(n_tokens: int, holdout: float, seq_len: int) -> int:
    """First held-out row: the last `holdout` of the tokens, on a sequence boundary."""
    held = int(round(n_tokens * holdout / seq_len)) * seq_len
    return max(seq_len, n_tokens - max(seq_len, held))


def hot_order(active: np.ndarray) -> np.ndarray:
    """Neurons by activation frequency, most frequent first (ties by id)."""
    return np.argsort(-active.sum(axis=0), kind="stable")


def coactivation(active: np.ndarray, max_tokens: int = 2048) -> np.ndarray:
    """(n, n) float32 co-activation counts over up to `max_tokens` tokens (diagonal 0)."""
    rows = active[np.linspace(0, len(active) - 1, min(max_tokens, len(active))).astype(int)]
    a = rows.astype(np.float32)
    counts = a.T @ a  # (n, n): tokens in which both are active
    np.fill_diagonal(counts, 0)
    return counts


def coact_order(active: np.ndarray, neighbours: int = 16, max_tokens: int = 2048) -> np.ndarray:
    """Ripple-style order: greedy max-weight path cover of the co-activation graph, chains
    laid out by their most frequent member, hottest first."""
    counts = coactivation(active, max_tokens)
    n = counts.shape[0]
    k = min(neighbours, n - 1)
    nbr = np.argpartition(-counts, k - 1, axis=1)[:, :k]  # (n, k) strongest partners
    i = np.repeat(np.arange(n), k)
    j = nbr.reshape(-1)
    w = counts[i, j]
    keep = (i < j) | ~np.isin(i * n + j, j * n + i)  # each undirected edge once
    i, j, w = i[keep], j[keep], w[keep]
    by_weight = np.argsort(-w, kind="stable")
    chains = _path_cover(n, i[by_weight], j[by_weight])
    freq = active.sum(axis=0)
    chains.sort(key=lambda c: -max(freq[c]))
    return np.concatenate([np.asarray(c, dtype=np.int64) for c in chains])


def _path_cover(n: int, src: np.ndarray, dst: np.ndarray) -> list[list[int]]:
    """Greedy path cover: take edges in the given order when both ends have degree < 2 and
    they are in different paths (union-find). Returns the paths, walked end to end."""
    parent = list(range(n))
    degree = [0] * n
    adj: list[list[int]] = [[] for _ in range(n)]

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(src.tolist(), dst.tolist(), strict=True):
        if degree[a] < 2 and degree[b] < 2 and (ra := root(a)) != (rb := root(b)):
            parent[ra] = rb
            degree[a] += 1
            degree[b] += 1
            adj[a].append(b)
            adj[b].append(a)
    seen = [False] * n
    paths = []
    for start in range(n):
        if seen[start] or degree[start] == 2:
            continue
        path, prev, node = [], -1, start
        while node != -1:
            seen[node] = True
            path.append(node)
            nxt = [m for m in adj[node] if m != prev]
            prev, node = node, (nxt[0] if nxt else -1)
        paths.append(path)
    assert all(seen), "a cycle in a path cover (union-find should prevent it)"
    return paths


def order_for(method: str, active: np.ndarray) -> np.ndarray:
    if method == "hot":
        return hot_order(active)
    if method == "coact":
        return coact_order(active)
    if method == "identity":
        return np.arange(active.shape[1])
    raise ValueError(f"placement method must be one of {METHODS}, got {method!r}")


@dataclass
class ReadTotals:
    """Reads of one order over replayed tokens (sums; divide by tokens for per-token)."""

    tokens: int = 0
    reads: int = 0
    bytes: int = 0
    needed: int = 0
    seconds: float = 0.0  # cost-model device time

    def add(self, reads: int, nbytes: int, needed: int, seconds: float) -> None:
        self.reads += reads
        self.bytes += nbytes
        self.needed += needed
        self.seconds += seconds

    def per_token(self) -> dict:
        t = max(1, self.tokens)
        return {"reads": self.reads / t, "bytes": self.bytes / t, "needed": self.needed / t,
                "amplification": self.bytes / max(1, self.needed), "ms": 1e3 * self.seconds / t}


def new_sets(active: np.ndarray, window: int) -> list[np.ndarray]:
    """Per token, the active ids not active in the `window - 1` previous tokens (what a window
    cache of unbounded capacity reads)."""
    out = []
    for t in range(len(active)):
        recent = active[max(0, t - window + 1):t].any(axis=0) if window > 1 else None
        now = active[t] if recent is None else active[t] & ~recent
        out.append(np.nonzero(now)[0])
    return out


def evaluate(order: np.ndarray, new: list[np.ndarray], stride: int, cost: CostModel,
             planner: str, *, direct: bool = True, threads: int = 8,
             totals: ReadTotals | None = None) -> ReadTotals:
    """Replay per-token new ids (original) through `order` and the planner (no disk I/O)."""
    totals = totals or ReadTotals()
    position = np.argsort(order)
    for ids in new:
        pos = np.sort(position[ids])
        plan = plan_reads(pos, stride, planner, cost, threads=threads, direct=direct)
        nbytes = int(span_bytes(plan.starts, plan.stops, stride, direct).sum())
        totals.add(int(plan.starts.size), nbytes, int(ids.size) * stride, plan.seconds)
    totals.tokens += len(new)
    return totals


@dataclass
class PlaceReport:
    method: str
    keep: float
    train_tokens: int
    layers: int


def place(flash_dir: str | Path, calibration: str | Path, method: str = "coact",
          keep: float = 0.3, holdout: float = 0.2, progress: Progress | None = None
          ) -> PlaceReport:
    """Reorder every layer's bundle file of `flash_dir` by `method`, in place (crash-safe)."""
    root, calibration = Path(flash_dir), Path(calibration)
    manifest = read_manifest(root)
    if method not in METHODS:
        raise ValueError(f"placement method must be one of {METHODS}, got {method!r}")
    report = progress or (lambda what: None)
    info = json.loads((calibration / "calibration.json").read_text()) \
        if (calibration / "calibration.json").exists() else {}
    old_files, train, written = [e.file for e in manifest.layers], 0, []
    what, fix = f"place {root}", f"{root} was left as it was."
    need = _space_needed(root, manifest)
    check_free(what, root / MANIFEST, need, fix)
    current = root / MANIFEST
    try:
        for layer, entry in enumerate(manifest.layers):
            mag = calibration_mags(calibration, manifest, layer)
            train = split_holdout(len(mag), holdout, int(info.get("seq_len", 1)))
            active = active_sets(mag[:train], keep)
            order = order_for(method, active)
            current = root / placed_name(entry.file, layer, order)
            _rewrite_layer(root, manifest, layer, order, written)
            entry.hot = hot_order(active)[: entry.n_neurons // 2]
            report(f"layer {layer}")
        manifest.format_version = max(manifest.format_version, PLACED_FORMAT_VERSION)  # 3 stays 3
        manifest.placement = {"method": method, "keep": keep, "calibration": str(calibration),
                              "train_tokens": train, "holdout": holdout}
        current = root / MANIFEST
        _write_manifest(root, manifest)
    except BaseException as e:
        for rel in set(written) - set(old_files):  # the old manifest, still in place, does
            (root / rel).unlink(missing_ok=True)  # not list them
        if is_full(e):
            raise space_error(what, current, need, fix, e) from e
        raise
    _delete_unreferenced(root, manifest, old_files)
    return PlaceReport(method, keep, train, manifest.n_layers)


def _space_needed(root: Path, manifest: Manifest) -> int:
    """Bytes `place` writes beside the old files: every layer, and the manifest with its
    orders (base64 int32: ~5.4 bytes per neuron, order and hot)."""
    neurons = sum(e.n_neurons for e in manifest.layers)
    return manifest.ffn_bytes + (root / MANIFEST).stat().st_size + 8 * neurons


def placed_name(file: str, layer: int, order: np.ndarray) -> str:
    """The name of a layer file placed in `order`, beside `file` (tagged by the order)."""
    tag = "p" + hashlib.sha256(order.tobytes()).hexdigest()[:8]
    return f"{Path(file).parent}/layer_{layer:03d}.{tag}.bin"


def _rewrite_layer(root: Path, manifest: Manifest, layer: int, order: np.ndarray,
                   written: list[str]) -> None:
    """Write layer's rows in `order` (original ids) under `placed_name` (appended to
    `written` once it exists); update its entry."""
    entry = manifest.layers[layer]
    rows = read_layer_rows(root, manifest, layer)
    rel = placed_name(entry.file, layer, order)
    with atomic_write(root / rel) as tmp, open(tmp, "wb") as f:
        f.write(memoryview(np.ascontiguousarray(rows[order])))
    written.append(rel)
    entry.file, entry.order = rel, order
    entry.sha256, entry.blocks = file_checks(root / rel, bundle_block_size(entry.stride))


def _write_manifest(root: Path, manifest: Manifest) -> None:
    """Replace the manifest atomically: the commit point of `place`."""
    with atomic_write(root / MANIFEST) as tmp, open(tmp, "w") as f:
        f.write(manifest.to_json())


def _delete_unreferenced(root: Path, manifest: Manifest, old_files: list[str]) -> None:
    """After the commit: the old layer files the new manifest does not list."""
    live = {e.file for e in manifest.layers}
    for rel in old_files:
        if rel not in live:
            (root / rel).unlink(missing_ok=True)
