"""Sparsity predictors: which FFN neurons a token needs, guessed from the layer's input.

This module makes them for any converted model, in four steps:

1. Calibration (`record_activations`): the dense model runs over calibration text; for every
   layer the FFN input x (d_model) and the true activation magnitudes |h| (n_neurons) of every
   token are streamed into `.npy` memmaps in a calibration dir (never all in RAM).
2. Targets (`target_labels`): which neurons count as "active". ReLU-family FFNs: h > 0.
   SwiGLU/GeGLU are not sparse, so "active" is the smallest set of top-|h| neurons holding a
   fraction of the activation mass sum|h| ("mass:0.9"), or a fixed top fraction ("top:0.3").
3. Predictors (`train_layer`), of two kinds:
   - "linear", the paper's: `sigmoid(x @ A @ B + bias)`, A: (d_model, r), B: (r, n_neurons),
     trained with class-balanced binary cross-entropy and Adam from mlx.optimizers. Right for
     ReLU-family FFNs, where "active" is a half-space of x.
   - "ffn", a low-rank copy of the FFN's own input projections (`fit_lowrank_ffn`), scoring
     |act(gate x) * up x|. For SwiGLU a logit linear in x cannot express |up x| (an even
     function of x); measured on Qwen2.5-0.5B layer 12 at rank 128, the neurons it ranks in
     its top half hold 63% of sum|h| against 70% for this kind (and 87% for the true top
     half). See BENCHMARKS.md, "What we learned" about predictors.
4. Thresholds (`calibrate_thresholds`): per layer, on held-out tokens, the highest threshold
   whose prediction keeps `recall` of the target set's activation mass, for a grid of recalls
   (the operating point is chosen at load time).

The result is `predictors.safetensors` in the flash dir plus the manifest's `predictors` entry;
`PredictorSelector` plugs it into the runtime (`load(..., selector="predictor")`).

Speed on CPU: the `mlx[cpu]` wheel links the reference BLAS, measured ~2 GFLOP/s for a
(4096 x 896) @ (896 x 128) matmul here against ~20 with numpy's OpenBLAS. So on CPU the heavy
matmuls of calibration (the dense model's linear layers) and training (the loss gradients) run
in numpy, and Adam from mlx.optimizers applies the updates; on a GPU everything is MLX
(`backend="mlx"`, gradients by `mx.value_and_grad`). Both backends compute the same gradients
(tests/test_predictor.py checks it).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from tqdm import tqdm

from ..format.manifest import (
    MANIFEST,
    PREDICTORS,
    Manifest,
    file_entry,
    read_layer_rows,
    read_manifest,
)
from ..format.storage import atomic_write, write_text_atomic
from ..runtime.loader import load_tokenizer
from ..runtime.rows import split_bundles
from ..runtime.selectors.predictor import (
    DEFAULT_RECALL,
    FILE_FORMAT,
    FILE_VERSION,
    KINDS,
    LayerPredictor,
    Predictors,
    check_predictors,
)
from .calibration import (
    DEFAULT_DOC_CHARS,
    DEFAULT_TEXT,
    CalibrationInfo,
    calibration_sequences,
    default_documents,
    find_recording,
    load_layer,
    read_documents,
    record_activations,
)

DEFAULT_MASS = 0.9  # gated FFNs: neurons holding 90% of sum|h| are the target set


DEFAULT_RANK = 128


RECALL_GRID = (0.9, 0.95, 0.98, 0.99, 0.995)


@dataclass(frozen=True)
class Target:
    """Which neurons a token needs: "relu" (h > 0), "mass" (top-|h| set holding `value` of
    sum|h|) or "top" (the `value` fraction of neurons with the largest |h|)."""

    kind: str
    value: float = 1.0

    def __post_init__(self):
        if self.kind not in ("relu", "mass", "top"):
            raise ValueError(f"target kind must be 'relu', 'mass' or 'top', got {self.kind!r}")
        if not 0.0 < self.value <= 1.0:
            raise ValueError(f"target {self.kind}:{self.value} must be a fraction in (0, 1]")

    def __str__(self) -> str:
        return "relu" if self.kind == "relu" else f"{self.kind}:{self.value:g}"


def parse_target(text: str, relu_family: bool) -> Target:
    """"auto", "relu", "mass:0.9", "top:0.3" or a bare fraction (= mass) -> Target."""
    text = str(text).strip().lower()
    if text == "auto":
        return Target("relu") if relu_family else Target("mass", DEFAULT_MASS)
    if text == "relu":
        if not relu_family:
            raise ValueError("target 'relu' (active = h > 0) needs a ReLU-family FFN; this "
                             "model's FFN is gated/smooth: use mass:F or top:F (e.g. mass:0.9)")
        return Target("relu")
    kind, _, value = text.rpartition(":")
    try:
        return Target(kind or "mass", float(value))
    except ValueError as e:
        raise ValueError(f"target {text!r} is not understood ({e}); use auto, relu, mass:F or "
                         "top:F with F in (0, 1]") from e


def target_labels(mag: np.ndarray, target: Target) -> np.ndarray:
    """mag: (T, n) |h| -> (T, n) bool, the neurons each token needs."""
    if target.kind == "relu":
        return mag > 0  # relu / relu^2 are >= 0, so |h| > 0 is h > 0
    n = mag.shape[1]
    order = np.argsort(-mag, axis=1)  # (T, n), largest first
    if target.kind == "top":
        k = np.full(len(mag), max(1, math.ceil(target.value * n)))
    else:
        csum = np.cumsum(np.take_along_axis(mag, order, axis=1), axis=1, dtype=np.float64)
        need = target.value * csum[:, -1:]
        k = np.minimum((csum < need).sum(axis=1) + 1, n)  # smallest k with csum[k-1] >= need
    labels = np.zeros(mag.shape, dtype=bool)
    np.put_along_axis(labels, order, np.arange(n)[None, :] < k[:, None], axis=1)
    return labels


@dataclass
class TrainConfig:
    """How predictors are made. ranks: per-layer overrides of `rank`.

    kind: "linear" (sigmoid(x A B + b), class-balanced BCE with Adam: the paper's predictor,
    the default for ReLU-family FFNs whose "active" is a half-space of x), "ffn" (low-rank FFN
    fit to the layer's weights, the default for gated/smooth FFNs), or "auto".
    """

    rank: int = DEFAULT_RANK
    ranks: dict[int, int] = field(default_factory=dict)
    target: str = "auto"
    recall: float = DEFAULT_RECALL  # the default operating point
    recall_grid: tuple[float, ...] = RECALL_GRID  # thresholds also stored for these
    kind: str = "auto"
    epochs: int = 10
    batch_size: int = 256
    lr: float = 3e-3
    holdout: float = 0.2  # last fraction of the calibration sequences, for thresholds
    seed: int = 0
    backend: str = "auto"  # "numpy" (CPU default) or "mlx" (GPU default)
    store_dtype: str = "float16"

    def __post_init__(self):
        if self.rank < 1 or any(r < 1 for r in self.ranks.values()):
            raise ValueError(f"ranks must be >= 1, got rank={self.rank}, ranks={self.ranks}")
        if not all(0.0 < r <= 1.0 for r in (self.recall, *self.recall_grid)):
            raise ValueError(f"recalls must be in (0, 1], got {self.recall}, "
                             f"{self.recall_grid}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and lr must be positive")
        if self.kind not in ("auto", *KINDS):
            raise ValueError(f"kind must be 'auto', 'linear' or 'ffn', got {self.kind!r}")
        if self.backend not in ("auto", "numpy", "mlx"):
            raise ValueError(f"backend must be 'auto', 'numpy' or 'mlx', got {self.backend!r}")
        if self.store_dtype not in ("float16", "float32"):
            raise ValueError(f"store_dtype must be float16 or float32, got {self.store_dtype!r}")

    def rank_of(self, layer: int) -> int:
        return self.ranks.get(layer, self.rank)

    @property
    def recalls(self) -> list[float]:
        return sorted({float(self.recall), *map(float, self.recall_grid)})

    def resolved_kind(self, relu_family: bool) -> str:
        if self.kind != "auto":
            return self.kind
        return "linear" if relu_family else "ffn"

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "numpy" if mx.default_device() == mx.cpu else "mlx"


@dataclass
class LayerReport:
    """Held-out quality of one layer's predictor (means over tokens)."""

    layer: int
    rank: int
    tau: float
    recall: float  # mass of the target set that is predicted / the target set's mass
    mass_kept: float  # mass predicted / all mass sum|h|
    precision: float  # predicted neurons that are in the target set
    predicted: float  # fraction of neurons predicted per token
    target_size: float  # fraction of neurons in the target set per token
    loss: float  # last epoch's training loss (kind "linear")
    seconds: float


def class_weights(labels: np.ndarray) -> tuple[float, float]:
    """Balanced BCE weights (w_pos, w_neg): both classes weigh half of the loss."""
    p = float(np.clip(labels.mean(), 1e-6, 1 - 1e-6))
    return 0.5 / p, 0.5 / (1.0 - p)


def balanced_bce_numpy(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                       w_pos: float, w_neg: float) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and gradients of the class-balanced BCE, by hand (numpy BLAS).

    x: (b, d), y: (b, n) bool; params A (d, r), B (r, n), bias (n,).
    loss = mean(w * (softplus(z) - y z)), z = x A B + bias, w = w_pos where y else w_neg.
    """
    A, B, bias = params["A"], params["B"], params["bias"]
    hidden = x @ A  # (b, r)
    z = hidden @ B + bias  # (b, n)
    w = np.where(y, np.float32(w_pos), np.float32(w_neg))
    loss = float(np.mean(w * (np.logaddexp(0, z) - y * z)))
    sigmoid = 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|
    g = w * (sigmoid - y) / np.float32(z.size)  # dloss/dz, (b, n)
    grads = {"A": x.T @ (g @ B.T), "B": hidden.T @ g, "bias": g.sum(axis=0)}
    return loss, grads


def balanced_bce_mlx(params: dict[str, mx.array], x: mx.array, y: mx.array, w_pos: float,
                     w_neg: float) -> mx.array:
    """The same loss in MLX (differentiated by mx.value_and_grad); y: (b, n) float 0/1."""
    z = x @ params["A"] @ params["B"] + params["bias"]
    w = mx.where(y > 0, w_pos, w_neg)
    return mx.mean(w * nn.losses.binary_cross_entropy(z, y, with_logits=True,
                                                      reduction="none"))


def _init_params(d: int, n: int, rank: int, labels: np.ndarray, w_pos: float, w_neg: float,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random A, B; bias = each neuron's best constant logit under the balanced loss."""
    rate = labels.mean(axis=0)  # (n,)
    prob = np.clip(w_pos * rate / (w_pos * rate + w_neg * (1 - rate)), 1e-4, 1 - 1e-4)
    return {"A": (rng.standard_normal((d, rank)) / math.sqrt(d)).astype(np.float32),
            "B": (rng.standard_normal((rank, n)) * 0.1 / math.sqrt(rank)).astype(np.float32),
            "bias": np.log(prob / (1 - prob)).astype(np.float32)}


def _fit(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, cfg: TrainConfig,
         rng: np.random.Generator) -> tuple[dict[str, np.ndarray], float]:
    """Adam (mlx.optimizers) over minibatches; returns the params and the last epoch's loss."""
    w_pos, w_neg = class_weights(y)
    steps_per_epoch = -(-len(x) // cfg.batch_size)
    schedule = optim.cosine_decay(cfg.lr, cfg.epochs * steps_per_epoch, cfg.lr * 0.05)
    opt = optim.Adam(learning_rate=schedule)
    backend = cfg.resolved_backend()
    state = {k: mx.array(v) for k, v in params.items()}
    loss_and_grad = mx.value_and_grad(balanced_bce_mlx)
    epoch_loss = 0.0
    for _ in range(cfg.epochs):
        order, losses = rng.permutation(len(x)), []
        for start in range(0, len(x), cfg.batch_size):
            rows = np.sort(order[start:start + cfg.batch_size])
            if backend == "numpy":
                loss, grads = balanced_bce_numpy(params, x[rows], y[rows], w_pos, w_neg)
                grads = {k: mx.array(v) for k, v in grads.items()}
            else:
                loss, grads = loss_and_grad(state, mx.array(x[rows]),
                                            mx.array(y[rows].astype(np.float32)), w_pos, w_neg)
            state = opt.apply_gradients(grads, state)
            mx.eval(state, opt.state)  # one step at a time: keeps the graph from growing
            if backend == "numpy":
                params = {k: np.array(v) for k, v in state.items()}
            losses.append(float(loss))
        epoch_loss = float(np.mean(losses))
    return {k: np.array(v) for k, v in state.items()}, epoch_loss


def _fold_normalization(params: dict[str, np.ndarray], mean: np.ndarray,
                        std: np.ndarray) -> LayerPredictor:
    """Training saw (x - mean) / std; fold that into A and bias so the predictor reads raw x."""
    A = params["A"] / std[:, None]
    bias = params["bias"] - (mean @ A) @ params["B"]
    return LayerPredictor(A.astype(np.float32), params["B"].astype(np.float32),
                          bias.astype(np.float32))


def _round_to_storage(pred: LayerPredictor, dtype: str) -> LayerPredictor:
    """What the predictor will be after a save and load (thresholds are fit on this)."""
    def cast(a: np.ndarray) -> np.ndarray:
        if dtype == "float32":
            return a
        low = a.astype(np.float16)
        return low.astype(np.float32) if np.isfinite(low).all() else a

    return LayerPredictor(cast(pred.A), cast(pred.B), pred.bias, pred.tau, pred.kind,
                          pred.activation, dict(pred.taus))


def split_rows(n_rows: int, holdout: float) -> int:
    """Rows [0, split) train, [split, n_rows) are held out (the last sequences)."""
    split = int(round(n_rows * (1 - holdout)))
    if split < 1 or split >= n_rows:
        raise ValueError(f"{n_rows} calibration tokens cannot be split for holdout {holdout}; "
                         "record more tokens")
    return split


def train_linear(x: np.ndarray, labels: np.ndarray, rank: int, cfg: TrainConfig,
                 seed: int = 0) -> tuple[LayerPredictor, float]:
    """The paper's predictor: sigmoid(x A B + bias), class-balanced BCE, Adam.

    x: (N, d) training inputs, labels: (N, n) bool. Inputs are standardized for training and
    the standardization folded into A and bias. Returns the predictor (tau unset) and the last
    epoch's loss.
    """
    rng = np.random.default_rng(seed)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    x_train = ((x - mean) / std).astype(np.float32)
    w_pos, w_neg = class_weights(labels)
    params = _init_params(x.shape[1], labels.shape[1], rank, labels, w_pos, w_neg, rng)
    params, loss = _fit(params, x_train, labels, cfg, rng)
    return _fold_normalization(params, mean, std), loss


def fit_lowrank_ffn(x: np.ndarray, weights: np.ndarray, biases: np.ndarray | None,
                    activation: str, rank: int) -> LayerPredictor:
    """The FFN's input projections at rank r, best for the inputs the layer really sees.

    x: (N, d) calibration inputs; weights: (P, n, d) the layer's rows (gate, up, down or up,
    down); biases: (P - 1, n) or None. For each input projection W this is reduced-rank
    regression: with S the covariance of x, the rank-r map minimizing E|x W^T - x A B|^2 is
    A = S^-1/2 U_r, B = U_r^T S^1/2 W^T with U_r the top left singular vectors of S^1/2 W^T;
    the bias makes it exact at the mean input. No gradient steps: the weights say what the
    neurons compute, and a few thousand tokens are enough for a (d, d) covariance but not to
    learn (d, n) maps. U_r comes from the (d, d) Gram matrix (eigh), not an SVD of (d, n):
    ~1 s per layer instead of ~15 for the default model.
    """
    d = x.shape[1]
    rank = min(rank, d, weights.shape[1])
    mean = x.mean(axis=0, dtype=np.float64)
    xc = (x - mean).astype(np.float32)
    cov = (xc.T @ xc).astype(np.float64) / len(x)  # (d, d)
    eigval, eigvec = np.linalg.eigh(cov)
    eigval = np.maximum(eigval, eigval.max() * 1e-8)
    half = ((eigvec * np.sqrt(eigval)) @ eigvec.T).astype(np.float32)
    inv_half = (eigvec / np.sqrt(eigval)) @ eigvec.T
    As, Bs, cs = [], [], []
    for j, w in enumerate(weights[:-1]):
        m = half @ w.T  # (d, n) float32: the projection in whitened coordinates
        _, u = np.linalg.eigh((m @ m.T).astype(np.float64))  # ascending eigenvalues
        u = u[:, ::-1][:, :rank]  # (d, r) top left singular vectors of m
        a, b = inv_half @ u, u.T.astype(np.float32) @ m  # (d, r), (r, n)
        c = mean @ w.T - (mean @ a) @ b + (biases[j] if biases is not None else 0.0)
        As.append(a)
        Bs.append(b)
        cs.append(c)
    return LayerPredictor(np.stack(As).astype(np.float32), np.stack(Bs).astype(np.float32),
                          np.stack(cs).astype(np.float32), kind="ffn", activation=activation)


def mass_recall(scores: np.ndarray, tau: float, labels: np.ndarray,
                mag: np.ndarray) -> float:
    """Mean over tokens of (target mass predicted) / (target mass). All (T, n)."""
    target_mass = np.where(labels, mag, 0).sum(axis=1)
    hit = np.where(labels & (scores > tau), mag, 0).sum(axis=1)
    ok = target_mass > 0
    return float(np.mean(hit[ok] / target_mass[ok])) if ok.any() else 1.0


def calibrate_thresholds(scores: np.ndarray, labels: np.ndarray, mag: np.ndarray,
                         recalls: list[float]) -> dict[float, float]:
    """Per recall, the highest threshold whose predictions keep that share of the target mass.

    scores, labels, mag: (T, n) held-out tokens; recall is `mass_recall` (mean over tokens).
    Exact, in one sort: recall(tau) is a sum of per-neuron weights w = mag / (T * target
    mass of its token) over the target neurons with score > tau, so sorting all scores once
    gives it for every tau.
    """
    target = np.where(labels, mag, 0).astype(np.float64)  # (T, n)
    target_mass = target.sum(axis=1)
    ok = target_mass > 0
    weights = (target[ok] / target_mass[ok, None] / ok.sum()).ravel()
    flat = scores[ok].ravel().astype(np.float32)
    order = np.argsort(-flat, kind="stable")
    ranked, cum = flat[order], np.cumsum(weights[order])
    out = {}
    for recall in recalls:
        i = int(np.searchsorted(cum, recall - 1e-9))  # first prefix reaching the recall
        if i >= len(ranked):
            out[recall] = float(ranked[-1]) - 1.0 if len(ranked) else 0.0
        else:  # keep every score >= ranked[i]: the threshold is the float just below it
            out[recall] = float(np.nextafter(ranked[i], np.float32(-np.inf)))
    return out


def layer_report(layer: int, pred: LayerPredictor, x: np.ndarray, labels: np.ndarray,
                 mag: np.ndarray, loss: float = float("nan"), seconds: float = 0.0
                 ) -> LayerReport:
    """Held-out metrics of one layer. x: (T, d); labels, mag: (T, n)."""
    z = pred.scores(x)
    predicted = z > pred.tau
    total = mag.sum(axis=1)
    ok = total > 0
    kept = np.where(predicted, mag, 0).sum(axis=1)
    hits = (predicted & labels).sum()
    return LayerReport(layer, pred.rank, pred.tau, mass_recall(z, pred.tau, labels, mag),
                       float(np.mean(kept[ok] / total[ok])) if ok.any() else 1.0,
                       float(hits / max(1, predicted.sum())), float(predicted.mean()),
                       float(labels.mean()), loss, seconds)


def train_layer(x: np.ndarray, mag: np.ndarray, target: Target, rank: int, cfg: TrainConfig,
                layer: int = 0, kind: str = "linear", weights: np.ndarray | None = None,
                biases: np.ndarray | None = None, activation: str = "silu"
                ) -> tuple[LayerPredictor, LayerReport]:
    """Make one layer's predictor and set its threshold.

    x: (N, d) FFN inputs, mag: (N, n) |h|, rows in sequence order; the last `cfg.holdout` of
    the rows are held out for the threshold and the report. Kind "ffn" needs the layer's
    weights (P, n, d) and biases (P - 1, n) or None.
    """
    t0 = time.perf_counter()
    split = split_rows(len(x), cfg.holdout)
    labels = target_labels(mag, target)
    loss = float("nan")
    if kind == "linear":
        pred, loss = train_linear(x[:split], labels[:split], rank, cfg, cfg.seed + layer)
    elif weights is None:
        raise ValueError("kind 'ffn' needs the layer's weights")
    else:
        pred = fit_lowrank_ffn(x[:split], weights, biases, activation, rank)
    pred = _round_to_storage(pred, cfg.store_dtype)
    pred.taus = calibrate_thresholds(pred.scores(x[split:]), labels[split:], mag[split:],
                                     cfg.recalls)
    pred.tau = pred.taus[cfg.recall]
    report = layer_report(layer, pred, x[split:], labels[split:], mag[split:], loss,
                          time.perf_counter() - t0)
    return pred, report


def layer_weights(root: Path, manifest: Manifest, layer: int
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """One layer's FFN rows from its bundle file: weights (P, n, d) (a format-3 layer's down
    part zero: the ffn-kind predictors are fit to gate/up only), biases (P - 1, n)."""
    rows = read_layer_rows(root, manifest, layer)
    weights, biases = split_bundles(rows, manifest, mx.float32, layer, activations_only=True)
    return np.array(weights), None if biases is None else np.array(biases)


def train_predictors(calibration_dir: str | Path, cfg: TrainConfig,
                     flash_dir: str | Path | None = None, progress: bool = False
                     ) -> tuple[Predictors, list[LayerReport]]:
    """Make every layer's predictor from a recording made by `record_activations`.

    flash_dir (the recorded model) is needed by kind "ffn", which reads the FFN weights.
    """

    root = Path(calibration_dir)
    info = CalibrationInfo(**json.loads(CalibrationInfo.path(root).read_text()))
    target = parse_target(cfg.target, info.relu_family)
    kind = cfg.resolved_kind(info.relu_family)
    manifest = read_manifest(flash_dir) if flash_dir is not None else None
    if kind == "ffn" and manifest is None:
        raise ValueError("predictor kind 'ffn' is fit to the FFN weights: pass flash_dir")
    layers, reports = [], []
    bar = tqdm(range(info.n_layers), desc="train predictors", unit="layer",
               disable=not progress, file=sys.stderr)
    for layer in bar:
        x, mag = load_layer(root, layer)
        weights, biases = layer_weights(Path(flash_dir), manifest, layer) if kind == "ffn" \
            else (None, None)
        activation = manifest.ffn.activation if manifest else "silu"
        pred, report = train_layer(x, mag, target, cfg.rank_of(layer), cfg, layer, kind,
                                   weights, biases, activation)
        layers.append(pred)
        reports.append(report)
        bar.set_postfix_str(f"L{layer} recall {report.recall:.3f} predicted "
                            f"{report.predicted:.0%}")
    meta = {"kind": kind, "target": str(target), "recall": cfg.recall,
            "recalls": cfg.recalls, "ranks": [p.rank for p in layers], "rank": cfg.rank,
            "calibration_tokens": info.n_tokens, "holdout": cfg.holdout,
            "calibration_text": info.text,
            "heldout_recall": [round(r.recall, 4) for r in reports],
            "heldout_predicted": [round(r.predicted, 4) for r in reports]}
    if kind == "linear":
        meta["epochs"] = cfg.epochs
    return Predictors(layers, meta), reports


def _storage(a: np.ndarray, dtype: str) -> mx.array:
    if dtype == "float16" and np.isfinite(a.astype(np.float16)).all():
        return mx.array(a.astype(np.float16))
    return mx.array(a.astype(np.float32))


def save_predictors(flash_dir: str | Path, predictors: Predictors,
                    store_dtype: str = "float16") -> dict:
    """Write predictors.safetensors and the manifest's `predictors` entry; returns the entry.

    Crash-safe order: the file is written under a temp name; the old manifest entry (if any) is
    dropped, the file fsynced and renamed into place, then the new entry written. At every step
    the dir reads as valid (with the old predictors, none, or the new ones).
    """
    root = Path(flash_dir)
    manifest = read_manifest(root)
    check_predictors(predictors, manifest, str(root / PREDICTORS))
    recalls = [float(r) for r in predictors.meta.get("recalls", [])]
    if not recalls or any(set(p.taus) != set(recalls) for p in predictors.layers):
        raise ValueError("every layer needs a threshold for each of predictors.meta['recalls']")
    arrays = {}
    for i, p in enumerate(predictors.layers):
        arrays[f"layers.{i}.A"] = _storage(p.A, store_dtype)
        arrays[f"layers.{i}.B"] = _storage(p.B, store_dtype)
        arrays[f"layers.{i}.bias"] = mx.array(p.bias.astype(np.float32))
        arrays[f"layers.{i}.tau"] = mx.array([p.taus[r] for r in recalls], dtype=mx.float32)
    kinds = {p.kind for p in predictors.layers}
    if len(kinds) != 1:
        raise ValueError(f"all layers' predictors must be of one kind, got {sorted(kinds)}")
    with atomic_write(root / PREDICTORS) as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata={
            "format": FILE_FORMAT, "version": FILE_VERSION, "kind": kinds.pop(),
            "recalls": json.dumps(recalls),
            "n_layers": str(len(predictors.layers)), "meta": json.dumps(predictors.meta)})
        if manifest.predictors:
            manifest.predictors = None
            write_text_atomic(root / MANIFEST, manifest.to_json())
    entry = {**file_entry(root, PREDICTORS), **predictors.meta,
             "format": FILE_FORMAT, "version": FILE_VERSION}
    manifest.predictors = entry
    write_text_atomic(root / MANIFEST, manifest.to_json())
    return entry


def parse_layer_ranks(items: list[str]) -> dict[int, int]:
    """["0=256", "23=256"] -> {0: 256, 23: 256}."""
    out = {}
    for item in items:
        layer, sep, rank = item.partition("=")
        if not sep or not layer.strip().isdigit() or not rank.strip().isdigit():
            raise ValueError(f"--layer-rank {item!r}: expected LAYER=RANK, e.g. 0=256")
        out[int(layer)] = int(rank)
    return out


@dataclass
class TrainSummary:
    calibration_seconds: float
    training_seconds: float
    reused_recording: bool
    entry: dict
    reports: list[LayerReport]


def make_predictors(flash_dir: str | Path, cfg: TrainConfig, text: str | Path | None = None,
                    n_tokens: int = 4096, seq_len: int = 256,
                    calibration_dir: str | Path | None = None,
                    progress: bool = False) -> TrainSummary:
    """Calibrate (or reuse a recording), train, save: the whole `train-predictors` step.

    calibration_dir: where the activations go; reused when it already holds a recording of
    the same model and tokens. None: a temp dir under $TMPDIR, removed afterwards.
    """

    root = Path(flash_dir)
    manifest = read_manifest(root)
    parse_target(cfg.target, manifest.ffn.relu_family)  # fail before the slow part
    for layer in cfg.ranks:
        if not 0 <= layer < manifest.n_layers:
            raise ValueError(f"--layer-rank for layer {layer}: the model has layers "
                             f"0..{manifest.n_layers - 1}")
    tokenizer = load_tokenizer(root, manifest)
    if text is None:
        docs, description = default_documents(), DEFAULT_TEXT.format(chars=DEFAULT_DOC_CHARS)
    else:
        docs, description = read_documents(text), str(Path(text).resolve())
    tokens = calibration_sequences(tokenizer, docs, n_tokens, seq_len)
    temp = calibration_dir is None
    calib = Path(tempfile.mkdtemp(prefix="mlx-flash-calib-")) if temp else Path(calibration_dir)
    try:
        info = None if temp else find_recording(calib, manifest, tokens)
        reused = info is not None
        if info is None:
            info = record_activations(root, calib, tokens, description, progress)
        t0 = time.perf_counter()
        predictors, reports = train_predictors(calib, cfg, root, progress)
        train_seconds = time.perf_counter() - t0
        predictors.meta.update(calibration_seconds=round(info.seconds, 1),
                               training_seconds=round(train_seconds, 1))
        entry = save_predictors(root, predictors, cfg.store_dtype)
    finally:
        if temp:
            shutil.rmtree(calib, ignore_errors=True)
    return TrainSummary(0.0 if reused else info.seconds, train_seconds, reused, entry, reports)
