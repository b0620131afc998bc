"""Trained low-rank predictors at run time: the file format, loading and the selector."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from ...accel import build as accel_build
from ...format.arch import np_activation
from ...format.errors import FormatError
from ...format.manifest import MANIFEST, PREDICTORS, Manifest, read_manifest
from ...format.storage import load_checked_safetensors
from .base import Selection

DEFAULT_RECALL = 0.99  # 0.95 cost +16% perplexity on Qwen2.5-0.5B: notes/predictors.md


FILE_FORMAT = "mlx-flash-predictors"


FILE_VERSION = "1"


KINDS = ("linear", "ffn")


@dataclass
class LayerPredictor:
    """One layer's predictor; a neuron is predicted when its score is above tau.

    kind "linear" (the paper's): score = x @ A @ B + bias, a logit (sigmoid(score) > sigmoid(tau)
    is score > tau). A: (d, r), B: (r, n), bias: (n,).
    kind "ffn" (low-rank FFN): the FFN's own input projections at rank r, pre_j = x @ A[j] @ B[j]
    + bias[j], and score = |act(pre_0) * pre_1| (gated) or |act(pre_0)| (plain): an estimate
    of |h|. A: (m, d, r), B: (m, r, n), bias: (m, n), m = 2 gated, 1 plain.
    All float32 in memory.
    """

    A: np.ndarray
    B: np.ndarray
    bias: np.ndarray
    tau: float = 0.0  # the threshold in use
    kind: str = "linear"
    activation: str = "silu"  # used by kind "ffn"
    taus: dict[float, float] = field(default_factory=dict)  # recall -> threshold

    @property
    def rank(self) -> int:
        return self.A.shape[-1]

    def scores(self, x: np.ndarray) -> np.ndarray:
        """x: (T, d) float32 -> (T, n) float32, higher = more likely needed."""
        if self.kind == "linear":
            return _lowrank(x, self.A, self.B) + self.bias
        return self.combine([_lowrank(x, a, b) + c
                             for a, b, c in zip(self.A, self.B, self.bias, strict=True)])

    def combine(self, pre: list[np.ndarray]) -> np.ndarray:
        """Kind "ffn": the low-rank projections (with bias) -> |act(pre_0) * pre_1|."""
        act = np_activation(self.activation, pre[0])
        return np.abs(act * pre[1] if len(pre) == 2 else act)

    def select(self, x: np.ndarray) -> list[np.ndarray]:
        """x: (T, d) -> per token the ids with score > tau, highest score first."""
        return [ids_above(z, self.tau) for z in self.scores(x)]


SMALL_BATCH = 16  # tokens up to which `_lowrank` stays off the BLAS


def _lowrank(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x @ a @ b. x: (T, d), a: (d, r), b: (r, n) -> (T, n).

    Decode-sized inputs go through np.einsum's own loops, not the BLAS: a multithreaded
    OpenBLAS call between two MLX evaluations made its threads fight MLX's for the cores
    (measured on the default model, 2 cores: predictor 136 ms/token with the BLAS, 29 with
    OPENBLAS_NUM_THREADS=1; einsum needs no setting). Large batches (calibration) use the BLAS.
    """
    if len(x) > SMALL_BATCH:
        return (x @ a) @ b
    return np.einsum("tr,rn->tn", np.einsum("td,dr->tr", x, a), b)


def ids_above(z: np.ndarray, tau: float) -> np.ndarray:
    """z: (n,) -> ids with z > tau, in decreasing z (to 1/65535 of the kept scores' range).

    The order only decides which neurons a full cache drops first, so scores are bucketed
    into uint16 keys, which numpy sorts by radix: measured 2x faster than sorting the floats
    for the default model's ~4700 kept neurons.
    """
    ids = np.flatnonzero(z > tau)
    if ids.size < 2:
        return ids
    kept = z[ids]
    top, span = kept.max(), float(kept.max() - kept.min())
    key = ((top - kept) * (65535.0 / span if span > 0 else 0.0)).astype(np.uint16)
    return ids[np.argsort(key, kind="stable")]


@dataclass
class Predictors:
    """All layers' predictors plus what they were made for (the manifest entry's extras)."""

    layers: list[LayerPredictor]
    meta: dict = field(default_factory=dict)

    def use_recall(self, recall: float, where: str = PREDICTORS) -> None:
        """Switch every layer to its threshold for `recall` (one of the calibrated ones)."""
        have = sorted(self.layers[0].taus) if self.layers else []
        match = [r for r in have if abs(r - float(recall)) < 1e-9]
        if not match:
            raise ValueError(f"{where} has thresholds for recalls {have}, not {recall}; pick "
                             "one of those or retrain with `mlx-flash train-predictors "
                             f"--recall {recall}`")
        for p in self.layers:
            p.tau = p.taus[match[0]]
        self.meta["recall_in_use"] = match[0]


def expected_shapes(kind: str, manifest: Manifest, layer: int, rank: int) -> dict:
    """The array shapes one layer's predictor must have for this model."""
    d, n = manifest.ffn.d_model, manifest.layers[layer].n_neurons
    if kind == "linear":
        return {"A": (d, rank), "B": (rank, n), "bias": (n,)}
    m = 2 if manifest.ffn.kind == "gated" else 1
    return {"A": (m, d, rank), "B": (m, rank, n), "bias": (m, n)}


def check_predictors(predictors: Predictors, manifest: Manifest, where: str) -> None:
    """Shapes must fit the model: one predictor per layer, of a known kind, sized for it."""
    fix = "retrain them with `mlx-flash train-predictors DIR`"
    if len(predictors.layers) != manifest.n_layers:
        raise FormatError(f"{where}: predictors for {len(predictors.layers)} layers but the "
                          f"model has {manifest.n_layers}; {fix}")
    for i, pred in enumerate(predictors.layers):
        if pred.kind not in KINDS:
            raise FormatError(f"{where}: unknown predictor kind {pred.kind!r}; {fix}")
        want = expected_shapes(pred.kind, manifest, i, pred.rank)
        got = {"A": pred.A.shape, "B": pred.B.shape, "bias": pred.bias.shape}
        if pred.rank < 1 or want != got:
            raise FormatError(f"{where}: layer {i} predictor shapes {got} do not fit the model "
                              f"(d_model {manifest.ffn.d_model}, "
                              f"{manifest.layers[i].n_neurons} neurons, {manifest.ffn.kind} "
                              f"FFN: want {want} for kind {pred.kind!r}); {fix}")


def load_predictors(flash_dir: str | Path, manifest: Manifest | None = None,
                    recall: float | None = None) -> Predictors:
    """Read and check predictors.safetensors against the manifest (sha256, format, shapes).

    recall: the operating point, one of the file's recalls (None: the default it was trained
    with). Raises FormatError naming the file, with the fix, when it is missing, corrupted, or
    made for another model; ValueError for a recall it has no thresholds for.
    """
    root = Path(flash_dir)
    manifest = manifest or read_manifest(root)
    path = root / PREDICTORS
    fix = f"retrain them with `mlx-flash train-predictors {root}`"
    if not manifest.predictors:
        raise FormatError(f"{root / MANIFEST} lists no predictors; {fix} (or use the oracle "
                          "selector)")
    entry = manifest.predictors
    path = root / entry.get("file", PREDICTORS)
    arrays, metadata = load_checked_safetensors(path, entry.get("sha256"), MANIFEST,
                                                FILE_FORMAT, FILE_VERSION, "predictors", fix)
    try:
        recalls = [float(r) for r in json.loads(metadata.get("recalls", "[]"))]
        meta = json.loads(metadata.get("meta", "{}"))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise FormatError(f"{path}: unreadable header metadata ({e}); {fix}") from e
    layers = []
    for i in range(manifest.n_layers):
        keys = [f"layers.{i}.{k}" for k in ("A", "B", "bias", "tau")]
        if any(k not in arrays for k in keys):
            raise FormatError(f"{path}: layer {i} is missing (want {keys}); {fix}")
        A, B, bias, tau = (np.array(arrays[k].astype(mx.float32)) for k in keys)
        if tau.shape != (len(recalls),) or not recalls:
            raise FormatError(f"{path}: layer {i} has thresholds of shape {tau.shape} for "
                              f"recalls {recalls}; {fix}")
        taus = dict(zip(recalls, map(float, tau), strict=True))
        layers.append(LayerPredictor(A, B, bias, 0.0, metadata.get("kind", "linear"),
                                     manifest.ffn.activation, taus))
    predictors = Predictors(layers, meta)
    check_predictors(predictors, manifest, str(path))
    predictors.use_recall(meta.get("recall", recalls[0]) if recall is None else recall,
                          str(path))
    return predictors


class PredictorSelector:
    """The runtime's selector from trained predictors: ids = score > tau, best first.

    Runs in numpy: per layer and token (d + n) * r multiply-adds for kind "linear", twice
    that for a gated "ffn" (1.5 M at r=128 for the default model, ~11% of its dense FFN), off
    the BLAS for decode-sized inputs (see `_lowrank`). Weights are float32 in memory: twice
    the size of predictors.safetensors.
    """

    def __init__(self, predictors: Predictors, backend=None):
        """backend: the load's CacheBackend, whose `predictor_scorer` scores each layer (the
        fast CPU path's f16 `FastLayerPredictor`); None: the LayerPredictors in numpy."""
        self.predictors = predictors
        self.scorers = [p if backend is None else backend.predictor_scorer(p)
                        for p in predictors.layers]

    @classmethod
    def from_dir(cls, flash_dir: str | Path, manifest: Manifest | None = None,
                 recall: float | None = None, backend=None) -> PredictorSelector:
        return cls(load_predictors(flash_dir, manifest, recall), backend)

    def select(self, layer: int, x: mx.array) -> Selection:
        """x: (T, d) evaluated, compute dtype -> each token's predicted ids, best first."""
        # x is evaluated: np.array only copies it (and casts when the compute dtype is not f32)
        xs = np.array(x if x.dtype == mx.float32 else x.astype(mx.float32))
        tau = self.predictors.layers[layer].tau
        return Selection([ids_above(z, tau) for z in self.scorers[layer].scores(xs)])


class FastLayerPredictor:
    """A LayerPredictor on the fast CPU path: A and B as f16 rows (A^T (r, d), B^T (n, r)) for
    `linear16`, half the bytes of the f32 arrays that decode would otherwise stream per token
    (measured: the f32 predictor was 15.7% of a fast decode step, BENCHMARKS.md)."""

    def __init__(self, layer: LayerPredictor):
        self.layer, self.kernels = layer, accel_build.kernels()
        a = layer.A if layer.kind == "ffn" else layer.A[None]
        b = layer.B if layer.kind == "ffn" else layer.B[None]
        self.a = [np.ascontiguousarray(m.T).astype(np.float16).view(np.uint16) for m in a]
        self.b = [np.ascontiguousarray(m.T).astype(np.float16).view(np.uint16) for m in b]
        self.bias = layer.bias if layer.kind == "ffn" else layer.bias[None]

    def scores(self, x: np.ndarray) -> np.ndarray:
        k = self.kernels
        pre = [k.linear16(b, "float16", k.linear16(a, "float16", x)) + c
               for a, b, c in zip(self.a, self.b, self.bias, strict=True)]
        return pre[0] if self.layer.kind == "linear" else self.layer.combine(pre)
