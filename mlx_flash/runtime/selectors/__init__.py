"""Selectors: which neurons a token needs."""

from __future__ import annotations

from ...format.manifest import Manifest
from ..config import FlashConfig
from ..store import NeuronStore
from .oracle import OracleSelector
from .predictor import PredictorSelector
from .quant_copy import DEFAULT_KEEP, QuantCopySelector
from .sequence import DEFAULT_KEEP as SEQUENCE_KEEP
from .sequence import SequenceSelector


def make_selector(config: FlashConfig, store: NeuronStore, manifest: Manifest, backend
                  ) -> OracleSelector | PredictorSelector | QuantCopySelector | SequenceSelector:
    """The selector `config.selector` names, scoring on the load's CacheBackend.

    "predictor": the dir's trained predictors at `predictor_recall` (None: their default);
    "oracle": true activations (`oracle_rule`, `keep`, default 1.0); "quant": a 4-bit copy of
    gate/up keeps each token's top `keep` (default 0.5, quant_copy.py); "sequence": each layer's
    top `keep` (default 0.7) of the prompt's activations for the whole sequence (sequence.py,
    `sequence_refresh`); "auto": predictor when the dir has them, else oracle."""
    name, keep = config.selector, config.keep
    if name == "auto":
        name = "predictor" if manifest.predictors else "oracle"
    if name == "predictor":
        return PredictorSelector.from_dir(store.root, manifest, config.predictor_recall, backend)
    if name == "sequence":
        return SequenceSelector(store, manifest, SEQUENCE_KEEP if keep is None else keep,
                                config.sequence_refresh, dtype=backend.compute_dtype)
    if name == "quant":
        return QuantCopySelector(store, manifest, backend, DEFAULT_KEEP if keep is None else keep)
    return OracleSelector(store, manifest, rule=config.oracle_rule,
                          keep=1.0 if keep is None else keep, dtype=backend.compute_dtype)
