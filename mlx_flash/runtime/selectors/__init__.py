"""Selectors: which neurons a token needs."""

from __future__ import annotations

import mlx.core as mx

from ...format.manifest import Manifest
from ..config import FlashConfig
from ..gate import ResidentGate
from ..store import NeuronStore
from .gate import DEFAULT_KEEP as GATE_KEEP
from .gate import GateSelector
from .oracle import OracleSelector
from .predictor import PredictorSelector
from .quant_copy import DEFAULT_KEEP, QuantCopySelector
from .sequence import DEFAULT_KEEP as SEQUENCE_KEEP
from .sequence import SequenceSelector


def make_selector(config: FlashConfig, store: NeuronStore, manifest: Manifest, backend,
                  gate: ResidentGate | None = None
                  ) -> (OracleSelector | PredictorSelector | QuantCopySelector | SequenceSelector
                        | GateSelector):
    """The selector `config.selector` names, scoring on the load's CacheBackend.

    "predictor": the dir's trained predictors at `predictor_recall` (None: their default);
    "oracle": true activations (`oracle_rule`, `keep`, default 1.0); "quant": a 4-bit copy of
    gate/up keeps each token's top `keep` (default 0.5, quant_copy.py); "sequence": each layer's
    top `keep` (default 0.7) of the prompt's activations for the whole sequence (sequence.py,
    `sequence_refresh`); "gate": a gate-resident dir's resident gate keeps each token's top
    `keep` (default 0.5) by |act(gate x)| (runtime/gate.py); "auto": predictor when the dir has
    them, else oracle. A gate-resident dir's bundles hold no gate: it selects with "gate" or
    every neuron (oracle rule "all")."""
    keep = config.keep
    name = check_selector(store.root, manifest, config.selector, config.oracle_rule)
    if gate is not None:
        return _gate_dir_selector(config, store, manifest, gate, name)
    if name == "predictor":
        return PredictorSelector.from_dir(store.root, manifest, config.predictor_recall, backend)
    if name == "sequence":
        return SequenceSelector(store, manifest, SEQUENCE_KEEP if keep is None else keep,
                                config.sequence_refresh, dtype=backend.compute_dtype)
    if name == "quant":
        return QuantCopySelector(store, manifest, backend, DEFAULT_KEEP if keep is None else keep)
    return OracleSelector(store, manifest, rule=config.oracle_rule,
                          keep=1.0 if keep is None else keep, dtype=backend.compute_dtype)


def check_selector(root, manifest: Manifest, name: str, rule: str) -> str:
    """The selector `name` ("auto" resolved) if this dir can serve it, else ValueError naming
    the dir: what make_selector refuses, checked before anything is loaded or computed."""
    if name == "auto":
        name = "predictor" if manifest.predictors else "oracle"
    if manifest.ffn.gate is not None and name != "gate" and (name, rule) != ("oracle", "all"):
        raise ValueError(f"{root} keeps the gate resident and its bundles hold up/down "
                         f"only: selector {name!r} (rule {rule!r}) cannot score them; use "
                         "--selector gate, or the oracle's 'all' (every neuron)")
    if manifest.ffn.gate is None and name == "gate":
        raise ValueError(f"{root}: selector 'gate' needs a gate-resident dir (made by "
                         "`mlx-flash convert --gate-resident`); this one keeps the gate in "
                         "its bundles")
    return name


def _gate_dir_selector(config: FlashConfig, store: NeuronStore, manifest: Manifest,
                       gate: ResidentGate, name: str) -> GateSelector | OracleSelector:
    """A gate-resident dir's selector: "gate", or the oracle's every neuron (exact)."""
    if name == "gate":
        return GateSelector(gate, GATE_KEEP if config.keep is None else config.keep)
    return OracleSelector(store, manifest, dtype=mx.float32)  # every neuron: check_selector
