"""Selectors: which neurons a token needs."""

from __future__ import annotations

from .oracle import OracleSelector
from .predictor import PredictorSelector
from .quant_copy import DEFAULT_KEEP, QuantCopySelector


def _make_selector(name, store, manifest, rule, keep, dtype, predictor_recall=None,
                   fast_cpu=False):
    """"predictor": the dir's trained predictors at `predictor_recall` (None: their default);
    "oracle": true activations (`rule`, `keep`); "quant": a 4-bit copy of gate/up keeps each
    token's top `keep` (quant_selector.py); "auto": predictor when the dir has them."""
    if name == "auto":
        name = "predictor" if manifest.predictors else "oracle"
    if name == "predictor":

        return PredictorSelector.from_dir(store.root, manifest, predictor_recall, fast_cpu)
    if name == "oracle":
        return OracleSelector(store, manifest, rule=rule, keep=1.0 if keep is None else keep,
                              dtype=dtype)
    if name == "quant":

        return QuantCopySelector(store, manifest, DEFAULT_KEEP if keep is None else keep,
                                 fast_cpu)
    raise ValueError(f"selector {name!r} is not known; use 'auto', 'predictor', 'oracle' or "
                     "'quant'")
