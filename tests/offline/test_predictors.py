"""Predictors: they learn a planted rule, round-trip through the flash dir, reject bad files,
and flash with them stays close to dense on tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.format.errors import FormatError
from mlx_flash.format.manifest import PREDICTORS, read_manifest
from mlx_flash.offline.calibration import (
    calibration_sequences,
    default_documents,
    find_recording,
    load_layer,
    mag_file,
    record_activations,
    x_file,
)
from mlx_flash.offline.train_predictors import (
    Target,
    TrainConfig,
    balanced_bce_mlx,
    balanced_bce_numpy,
    calibrate_thresholds,
    mass_recall,
    parse_target,
    save_predictors,
    target_labels,
    train_layer,
    train_predictors,
)
from mlx_flash.runtime.loader import load, load_dense
from mlx_flash.runtime.selectors.predictor import (
    LayerPredictor,
    Predictors,
    PredictorSelector,
    load_predictors,
)

PROMPT = [5, 9, 17, 33, 65, 129, 7, 8]


def planted_relu(n_tokens: int, seed: int, d: int = 24, n: int = 96):
    """x ~ N(0, I); h = relu(x W^T + c): neuron i is active iff a fixed half-space holds x."""
    rng = np.random.default_rng(123)  # the rule: the same for train and test data
    W, c = rng.standard_normal((n, d)), rng.normal(-0.5, 0.5, n)
    x = np.random.default_rng(seed).standard_normal((n_tokens, d)).astype(np.float32)
    return x, np.maximum(x @ W.T + c, 0).astype(np.float32)


def planted_gated(n_tokens: int, seed: int, d: int = 32, n: int = 128, k: int = 4):
    """A SwiGLU layer whose gate and up projections read a k-dim subspace of x.

    Returns x (N, d), |h| (N, n) and the weights (3, n, d) as a flash bundle holds them.
    """
    rng = np.random.default_rng(7)
    basis = rng.standard_normal((k, d))
    gate = rng.standard_normal((n, k)) @ basis / np.sqrt(d)
    up = rng.standard_normal((n, k)) @ basis / np.sqrt(d)
    x = np.random.default_rng(seed).standard_normal((n_tokens, d)).astype(np.float32)
    x += 0.3 * np.random.default_rng(seed + 1).standard_normal((n_tokens, d))  # off-subspace
    g = x @ gate.T
    mag = np.abs(g / (1 + np.exp(-g)) * (x @ up.T)).astype(np.float32)
    weights = np.stack([gate, up, rng.standard_normal((n, d))]).astype(np.float32)
    return x.astype(np.float32), mag, weights


def quality(pred: LayerPredictor, x: np.ndarray, labels: np.ndarray, mag: np.ndarray):
    """(mass recall, precision, fraction predicted) on fresh data."""
    predicted = pred.scores(x) > pred.tau
    recall = (np.where(labels & predicted, mag, 0).sum(1) / np.where(labels, mag, 0).sum(1))
    precision = (labels & predicted).sum() / predicted.sum()
    return float(recall.mean()), float(precision), float(predicted.mean())


# ---------------------------------------------------------------- learning the rule


def test_learns_planted_relu_rule():
    x, mag = planted_relu(3000, seed=1)
    cfg = TrainConfig(rank=24, epochs=25, batch_size=128, lr=1e-2, recall=0.98)
    pred, report = train_layer(x, mag, Target("relu"), 24, cfg)
    assert report.recall >= 0.98 - 1e-6  # the threshold's promise on held-out tokens
    x_test, mag_test = planted_relu(2000, seed=2)
    recall, precision, _ = quality(pred, x_test, mag_test > 0, mag_test)
    assert recall >= 0.97 and precision >= 0.9, (recall, precision)


def test_lowrank_ffn_finds_the_planted_subspace():
    """Kind "ffn": a rank-k fit recovers a FFN whose projections have rank k."""
    x, mag, weights = planted_gated(2000, seed=1)
    cfg = TrainConfig(recall=0.95, kind="ffn")
    target = Target("mass", 0.8)
    pred, report = train_layer(x, mag, target, 4, cfg, kind="ffn", weights=weights)
    assert pred.A.shape == (2, 32, 4) and pred.B.shape == (2, 4, 128)
    x_test, mag_test, _ = planted_gated(2000, seed=2)
    labels = target_labels(mag_test, target)
    recall, _, predicted = quality(pred, x_test, labels, mag_test)
    assert recall >= 0.94 and predicted < 0.5, (recall, predicted)
    # the scores are |h| itself (float16 storage aside), so the predicted sets are the true
    # sets above the same threshold
    np.testing.assert_allclose(pred.scores(x_test), mag_test, atol=1e-3 * mag_test.max())
    assert ((pred.scores(x_test) > pred.tau) == (mag_test > pred.tau)).mean() > 0.999


def test_numpy_gradients_equal_mlx_autodiff():
    rng = np.random.default_rng(0)
    params = {"A": rng.standard_normal((6, 3)).astype(np.float32),
              "B": rng.standard_normal((3, 10)).astype(np.float32),
              "bias": rng.standard_normal(10).astype(np.float32)}
    x = rng.standard_normal((7, 6)).astype(np.float32)
    y = rng.random((7, 10)) < 0.3
    loss, grads = balanced_bce_numpy(params, x, y, 1.7, 0.7)
    ref_loss, ref = mx.value_and_grad(balanced_bce_mlx)(
        {k: mx.array(v) for k, v in params.items()}, mx.array(x),
        mx.array(y.astype(np.float32)), 1.7, 0.7)
    assert loss == pytest.approx(float(ref_loss), rel=1e-5)
    for k in params:
        np.testing.assert_allclose(grads[k], np.array(ref[k]), rtol=1e-4, atol=1e-6)


def test_targets():
    mag = np.array([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert target_labels(mag, Target("mass", 0.7)).tolist() == [[1, 1, 0, 0, 0]]  # 7/10
    assert target_labels(mag, Target("mass", 0.71)).tolist() == [[1, 1, 1, 0, 0]]
    assert target_labels(mag, Target("top", 0.4)).tolist() == [[1, 1, 0, 0, 0]]
    assert target_labels(mag, Target("relu")).tolist() == [[1, 1, 1, 1, 0]]
    assert parse_target("auto", relu_family=True) == Target("relu")
    assert parse_target("0.8", relu_family=False) == Target("mass", 0.8)
    assert parse_target("top:0.3", relu_family=False) == Target("top", 0.3)
    with pytest.raises(ValueError, match="needs a ReLU-family FFN"):
        parse_target("relu", relu_family=False)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        parse_target("mass:1.5", relu_family=False)


def test_selector_returns_ids_above_threshold_best_first():
    pred = LayerPredictor(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32),
                          np.zeros(3, np.float32), tau=0.5)
    sel = PredictorSelector(Predictors([pred]))
    ids = sel.select(0, mx.array([[0.6, 2.0, -1.0], [0.0, 0.0, 0.0]])).ids
    assert ids[0].tolist() == [1, 0] and ids[1].tolist() == []


# ---------------------------------------------------------------- calibration text


class WordTokenizer:
    eos_token_id = 1

    def encode(self, text: str) -> list[int]:
        return [3 + len(w) % 50 for w in text.split()]


def test_default_text_is_deterministic_and_local():
    first, again = list(default_documents()), list(default_documents())
    assert first == again and len(first) > 100
    tokens = calibration_sequences(WordTokenizer(), iter(first), 1000, 64)
    assert tokens.shape == (15, 64) and tokens.dtype == np.int32
    with pytest.raises(ValueError, match="fewer than"):
        calibration_sequences(WordTokenizer(), iter(["a b c"]), 100, 10)


# ---------------------------------------------------------------- on tiny models


@pytest.fixture
def own_dir(tiny_dirs, tmp_path):
    """A private copy of a tiny flash dir (predictors are written into it)."""

    def get(arch: str) -> Path:
        _, flash_dir = tiny_dirs(arch)
        return Path(shutil.copytree(flash_dir, tmp_path / arch))

    return get


def tokens_for(n_seq: int, seq_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 256, (n_seq, seq_len)).astype(np.int32)


def test_calibration_streams_expected_files(own_dir, tmp_path):
    flash_dir = own_dir("qwen2")
    tokens = tokens_for(3, 16)
    info = record_activations(flash_dir, tmp_path / "calib", tokens)
    manifest = read_manifest(flash_dir)
    assert info.n_tokens == 48 and info.n_layers == 2 and not info.relu_family
    for layer in range(2):
        x = np.load(x_file(tmp_path / "calib", layer), mmap_mode="r")
        mag = np.load(mag_file(tmp_path / "calib", layer), mmap_mode="r")
        assert x.shape == (48, 64) and x.dtype == np.float32
        assert mag.shape == (48, 128) and mag.dtype == np.float16
    # layer 0's |h| is the dense MLP's own activation on the recorded inputs
    dense, _ = load_dense(flash_dir)
    mlp = dense.layers[0].mlp
    x, mag = load_layer(tmp_path / "calib", 0)
    xm = mx.array(x)
    h = np.abs(np.array(mx.sigmoid(mlp.gate_proj(xm)) * mlp.gate_proj(xm) * mlp.up_proj(xm)))
    np.testing.assert_allclose(mag, h, rtol=2e-3, atol=1e-3)
    assert find_recording(tmp_path / "calib", manifest, tokens) is not None
    assert find_recording(tmp_path / "calib", manifest, tokens_for(3, 16, seed=1)) is None


def train_tiny(flash_dir: Path, tmp_path: Path, **kw) -> Predictors:
    if not (tmp_path / "calib" / "calibration.json").exists():
        record_activations(flash_dir, tmp_path / "calib", tokens_for(16, 64))
    cfg = TrainConfig(**{"rank": 64, "epochs": 15, "batch_size": 128, "lr": 1e-2, **kw})
    predictors, _ = train_predictors(tmp_path / "calib", cfg, flash_dir)
    return predictors


@pytest.mark.parametrize("kind", ["ffn", "linear"])
def test_save_load_round_trip(own_dir, tmp_path, kind):
    flash_dir = own_dir("qwen2")
    predictors = train_tiny(flash_dir, tmp_path, rank=8, epochs=2, ranks={1: 4}, kind=kind)
    entry = save_predictors(flash_dir, predictors)
    manifest = read_manifest(flash_dir)
    assert manifest.predictors == entry
    assert entry["file"] == PREDICTORS and entry["target"] == "mass:0.9"
    assert entry["recall"] == 0.99 and entry["ranks"] == [8, 4] and entry["kind"] == kind
    loaded = load_predictors(flash_dir)
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    for a, b in zip(predictors.layers, loaded.layers, strict=True):
        assert b.kind == kind
        np.testing.assert_array_equal(a.A, b.A)  # thresholds were fit on the stored values
        np.testing.assert_array_equal(a.B, b.B)
        np.testing.assert_array_equal(a.bias, b.bias)
        assert a.tau == pytest.approx(b.tau)
        np.testing.assert_array_equal(a.scores(x), b.scores(x))
    assert sorted(loaded.layers[0].taus) == [0.9, 0.95, 0.98, 0.99, 0.995]
    strict = load_predictors(flash_dir, recall=0.995)
    # a higher recall needs a lower (or the same) threshold
    assert all(hi.tau <= lo.tau for hi, lo in zip(strict.layers, loaded.layers, strict=True))
    with pytest.raises(ValueError, match=r"thresholds for recalls .* not 0.5"):
        load(flash_dir, selector="predictor", predictor_recall=0.5)
    save_predictors(flash_dir, predictors)  # replacing them keeps the dir valid
    assert read_manifest(flash_dir).predictors["sha256"] == entry["sha256"]
    assert not list(flash_dir.glob("*.tmp*")) and not list(flash_dir.glob(".predictors*"))


def test_bad_predictors_files_are_rejected_clearly(own_dir, tmp_path):
    flash_dir = own_dir("qwen2")
    predictors = train_tiny(flash_dir, tmp_path, rank=4, epochs=1)
    save_predictors(flash_dir, predictors)
    path = flash_dir / PREDICTORS
    good = path.read_bytes()

    # a flipped byte: same size, so only the checksum can tell
    path.write_bytes(good[:-9] + bytes([good[-9] ^ 0xFF]) + good[-8:])
    with pytest.raises(FormatError, match=f"{path}: checksum mismatch.*train-predictors"):
        load(flash_dir, selector="predictor")

    # not safetensors at all, though the manifest agrees on size and checksum
    path.write_bytes(b"\x00" * len(good))
    _rewrite_entry(flash_dir)
    with pytest.raises(FormatError, match=f"{path}: not a readable safetensors file"):
        load_predictors(flash_dir)

    # made for another model: shapes do not fit this one
    wrong = Predictors([LayerPredictor(np.zeros((64, 4), np.float32),
                                       np.zeros((4, 100), np.float32),
                                       np.zeros(100, np.float32))] * 2)
    with pytest.raises(FormatError, match="do not fit the model"):
        save_predictors(flash_dir, wrong)
    arrays = {f"layers.{i}.{k}": mx.array(v) for i in range(2) for k, v in
              (("A", np.zeros((64, 4))), ("B", np.zeros((4, 100))), ("bias", np.zeros(100)),
               ("tau", np.zeros(1)))}
    mx.save_safetensors(str(path), arrays, metadata={"format": "mlx-flash-predictors",
                                                     "version": "1", "recalls": "[0.95]"})
    _rewrite_entry(flash_dir)
    with pytest.raises(FormatError, match=f"{path}: layer 0 predictor shapes.*do not fit"):
        load(flash_dir, selector="auto")

    # truncated: the manifest's size check names the file
    path.write_bytes(good[:100])
    with pytest.raises(FormatError, match=f"{path} is 100 bytes"):
        load(flash_dir, selector="predictor")


def _rewrite_entry(flash_dir: Path) -> None:
    """Make the manifest agree with whatever predictors.safetensors now holds."""
    from mlx_flash.format.manifest import file_entry

    manifest = json.loads((flash_dir / "manifest.json").read_text())
    manifest["predictors"].update(file_entry(flash_dir, PREDICTORS))
    (flash_dir / "manifest.json").write_text(json.dumps(manifest))


def test_no_predictors_means_oracle_for_auto_and_an_error_for_predictor(flash_load, own_dir):
    flash_dir = own_dir("llama")
    model, _ = flash_load(flash_dir, selector="auto")
    assert type(model.flash.selector).__name__ == "OracleSelector"
    with pytest.raises(FormatError, match="lists no predictors.*train-predictors"):
        flash_load(flash_dir, selector="predictor")


def test_flash_with_predictors_stays_close_to_dense(flash_load, own_dir, tmp_path):
    """nemotron (relu^2): active = up(x) > 0 is linear in x, so a rank-d predictor learns it."""
    flash_dir = own_dir("nemotron")
    save_predictors(flash_dir, train_tiny(flash_dir, tmp_path, recall=0.99))
    dense, _ = load_dense(flash_dir)
    flash, _ = flash_load(flash_dir, selector="auto", max_sparse_tokens=len(PROMPT))
    assert isinstance(flash.flash.selector, PredictorSelector)
    x = mx.array([PROMPT])
    want, got = np.array(dense(x)), np.array(flash(x))  # sparse path for all 8 tokens
    cosine = np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want)
    assert cosine >= 0.999 and np.abs(got - want).max() <= 0.1 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 7 / 8
    steps = flash.flash.stats.steps
    assert steps[0].neurons_active < 2 * 128  # the union of 8 tokens is still sparse


def test_eval_and_sweep_run_on_a_text_file(own_dir, tmp_path):
    from mlx_flash.offline.evaluate import EvalConfig, evaluate, sweep

    flash_dir = own_dir("nemotron")
    save_predictors(flash_dir, train_tiny(flash_dir, tmp_path, epochs=5))
    words = np.random.default_rng(3).integers(0, 250, 300)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in words))
    cfg = EvalConfig(ppl_tokens=40, prompts=2, prompt_tokens=8, max_tokens=4)
    report = evaluate(flash_dir, text, cfg)
    assert report.ppl_tokens == 40 and np.isfinite(report.flash_ppl) and report.dense_ppl > 1
    assert 0 <= report.greedy_match <= 1 and 0 <= report.token_agreement <= 1
    assert len(report.layers) == 2 and all(0 < q.predicted < 1 for q in report.layers)
    assert report.decode["tokens"] > 0 and report.predictor_time_share >= 0
    dense, points = sweep(flash_dir, text, ppl_tokens=40)
    assert dense == pytest.approx(report.dense_ppl, rel=1e-3)
    assert [p.recall for p in points] == [0.9, 0.95, 0.98, 0.99, 0.995]
    kept = [p.predicted for p in points]
    assert kept == sorted(kept) and kept[0] < kept[-1]  # higher recall, more neurons


def test_thresholds_are_the_highest_reaching_each_recall():
    rng = np.random.default_rng(5)
    mag = rng.exponential(1.0, (50, 40)).astype(np.float32)
    scores = (mag + rng.normal(0, 0.5, mag.shape)).astype(np.float32)
    labels = target_labels(mag, Target("mass", 0.8))
    taus = calibrate_thresholds(scores, labels, mag, [0.5, 0.9, 0.99, 1.0])
    for recall, tau in taus.items():
        assert mass_recall(scores, tau, labels, mag) >= recall - 1e-6
        above = np.unique(scores[scores > tau])[0]  # the lowest score still kept
        assert recall == 1.0 or mass_recall(scores, above, labels, mag) < recall
    assert taus[0.5] > taus[0.9] > taus[0.99] >= taus[1.0]
