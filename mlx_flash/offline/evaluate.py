"""`mlx-flash eval`: how faithful flash (with its predictors) is to the dense model, and its cost.

Over any text file:

- Perplexity, dense vs flash, over the first `ppl_tokens` tokens. Flash is fed in chunks of at
  most `max_sparse_tokens` tokens, so every call takes the sparse (decode) path and each token's
  FFN uses only that token's selected neurons: the fidelity of decoding, in 16x fewer calls.
- Prefix perplexity, as generation sees it: the first `prefix_tokens` go in as one prompt call
  (prefill: where the "sequence" selector chooses its set), the next `continuation_tokens` are
  scored, fed in decode-path chunks. Nothing chosen at the prefill sees a scored token.
- Greedy agreement: M prompts cut from the text at evenly spaced places (or the prompts of a
  `--prompt-file`, e.g. the packaged set of code, prose and chat prompts), N greedy tokens each.
  `greedy_match`: the mean fraction of the N tokens before flash first departs from dense;
  `token_agreement`: flash's top-1 on dense's continuation (teacher forced), which does not
  compound one early difference.
- Predictor quality per layer on the dense model's own FFN inputs (the same text): recall of the
  target set's activation mass, share of all mass kept, precision, neurons predicted per token.
- Decode cost, from flash's own stats while generating: tokens/s (dense too), bytes and reads
  per token, neurons active and newly loaded per token, and the predictor's share of the time.

Library code returns an `EvalReport`; `eval_cli` prints it and writes `--json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from ..format.manifest import read_manifest
from ..runtime.generate import common_prefix, format_prompt, stream
from ..runtime.loader import load, load_dense, load_tokenizer
from ..runtime.selectors import check_selector
from ..runtime.selectors.predictor import Predictors, load_predictors
from .calibration import numpy_linears, recording
from .train_predictors import parse_target, target_labels

PROMPT_SET = Path(__file__).parent / "data" / "prompts.jsonl"  # code, prose and chat prompts


@dataclass
class EvalConfig:
    ppl_tokens: int = 256  # tokens scored for perplexity
    prompts: int = 4  # M prompts for greedy agreement (cut from the text)
    prompt_file: str | None = None  # JSONL prompts instead ({"kind", "text", "chat"} a line)
    prefix_tokens: int = 256  # prefix perplexity: the prompt the set is chosen from ...
    continuation_tokens: int = 256  # ... and the tokens scored after it
    prompt_tokens: int = 32  # length of each prompt
    max_tokens: int = 32  # N greedy tokens per prompt
    selector: str = "auto"  # as `load`: auto, predictor, oracle, quant, sequence
    rule: str = "all"  # oracle rule (selector "oracle")
    keep: float | None = None  # oracle top fraction (1.0) or quant selector's (0.5)
    recall: float | None = None  # predictors' operating point (None: their default)
    refresh: int = 0  # sequence selector: choose again every N decoded tokens (0: never)
    window: int = 5
    dram_budget: str | None = None
    dtype: str | None = None

    def __post_init__(self):
        if self.ppl_tokens < 2 or self.prompt_tokens < 1 or self.prompts < 0 \
                or self.max_tokens < 1 or self.prefix_tokens < 1 \
                or self.continuation_tokens < 1:
            raise ValueError("ppl_tokens >= 2, prompt_tokens >= 1, prompts >= 0, "
                             "max_tokens >= 1, prefix_tokens >= 1 and continuation_tokens >= 1 "
                             "are needed")


@dataclass
class LayerQuality:
    layer: int
    recall: float  # target mass predicted / target mass (mean over tokens)
    mass_kept: float  # mass predicted / all mass
    precision: float  # predicted neurons in the target set / predicted neurons
    predicted: float  # neurons predicted per token (fraction of the layer)
    target_size: float  # neurons in the target set per token (fraction)


@dataclass
class EvalReport:
    model: str
    text: str
    settings: dict
    ppl_tokens: int
    dense_ppl: float
    flash_ppl: float
    greedy_match: float
    token_agreement: float
    prefix_tokens: int  # prefix perplexity: prompt tokens, then `continuation_tokens` scored
    continuation_tokens: int
    dense_prefix_ppl: float
    flash_prefix_ppl: float
    greedy_match_by_kind: dict  # prompt kind -> greedy_match over its prompts
    dense_tokens_per_s: float
    flash_tokens_per_s: float
    decode: dict  # bytes/reads/neurons per token, hit rate, seconds per token by part
    predictor_time_share: float  # predictor seconds / decode wall seconds
    selector: dict = field(default_factory=dict)  # the selector's own summary (sequence)
    layers: list[LayerQuality] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)  # prompt, dense and flash continuations

    def to_dict(self) -> dict:
        return asdict(self)


def read_text_tokens(tokenizer, path: str | Path) -> np.ndarray:
    """Token ids of a text file: (L,) int32. Undecodable bytes are replaced, not fatal."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--text-file {path} is not a file; pass any UTF-8 text file")
    ids = np.asarray(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")),
                     dtype=np.int32)
    if ids.size < 3:
        raise ValueError(f"{path} has {ids.size} tokens; evaluation needs a longer text")
    return ids


def prompt_entries(path: str | Path) -> list[tuple[str, str, bool]]:
    """A JSONL prompt file -> (kind, text, chat) per prompt.

    Each line: {"kind": "code" | "prose" | "chat" | ..., "text": str, "chat": bool (optional,
    default: kind == "chat"; through the chat template when the tokenizer has one)}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file {path} is not a file; pass a JSONL file of "
                                '{"kind": ..., "text": ...} lines')
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            text, kind = str(entry["text"]), str(entry.get("kind", "text"))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{number}: want a JSON object with a \"text\" ({e})") from e
        entries.append((kind, text, bool(entry.get("chat", kind == "chat"))))
    if not entries:
        raise ValueError(f"{path} holds no prompts")
    return entries


def prompt_ids(tokenizer, text: str, chat: bool) -> np.ndarray:
    """One prompt's token ids (L,) int32: through the chat template when `chat`."""
    return np.asarray(format_prompt(tokenizer, text) if chat else tokenizer.encode(text),
                      dtype=np.int32)


def read_prompts(tokenizer, path: str | Path) -> tuple[list[np.ndarray], list[str]]:
    """A JSONL prompt file (`prompt_entries`) -> (token ids (L,) int32 per prompt, kind per
    prompt)."""
    entries = prompt_entries(path)
    ids = [prompt_ids(tokenizer, text, chat) for _, text, chat in entries]
    return ids, [kind for kind, _, _ in entries]


def prefix_split(size: int, prefix: int, continuation: int) -> tuple[int, int]:
    """(prefix, scored) token counts for a text of `size` tokens: the asked ones, or for a
    shorter text half of it each (a prefix of at least one token, one scored)."""
    if size >= prefix + continuation + 1:
        return prefix, continuation
    prefix = max(1, min(prefix, (size - 1) // 2))
    return prefix, max(1, min(continuation, size - 1 - prefix))


def new_sequence(model) -> None:
    """A new, unrelated sequence starts: a selector that keeps per-sequence state forgets it."""
    reset = getattr(getattr(getattr(model, "flash", None), "selector", None), "reset", None)
    if reset is not None:
        reset()


def cut_prompts(tokens: np.ndarray, count: int, length: int) -> list[np.ndarray]:
    """`count` prompts of `length` tokens at evenly spaced places of the text."""
    length = min(length, tokens.size)
    starts = np.linspace(0, tokens.size - length, num=count).astype(int) if count else []
    return [tokens[s:s + length] for s in starts]


def nll(logits: mx.array, targets: np.ndarray) -> np.ndarray:
    """logits: (1, T, V), targets: (T,) -> (T,) float64 negative log-likelihoods."""
    logits = logits[0].astype(mx.float32)
    picked = mx.take_along_axis(logits, mx.array(targets[:, None].astype(np.int32)), axis=-1)
    return np.array(mx.logsumexp(logits, axis=-1) - picked[:, 0], dtype=np.float64)


def perplexity(model, tokens: np.ndarray, chunk: int, prefix: int = 0) -> float:
    """exp(mean NLL) of tokens[prefix + 1:] given what precedes each, fed `chunk` tokens per
    call after tokens[:prefix] (prefix > 0) went in as one unscored call (the prompt)."""

    new_sequence(model)
    cache, losses = make_prompt_cache(model), []
    if prefix:
        model(mx.array(tokens[None, :prefix]), cache=cache)
        mx.eval([c.state for c in cache])
    for start in range(prefix, tokens.size - 1, chunk):
        stop = min(tokens.size - 1, start + chunk)
        logits = model(mx.array(tokens[None, start:stop]), cache=cache)
        losses.append(nll(logits, tokens[start + 1:stop + 1]))  # np.array inside evaluates
    return float(np.exp(np.mean(np.concatenate(losses))))


def greedy(model, tokenizer, prompt: np.ndarray, n: int) -> tuple[list[int], float]:
    """N greedy tokens after `prompt`, and the decode speed (tokens/s, prompt excluded)."""

    out, tps = [], 0.0
    new_sequence(model)
    for response in stream(model, tokenizer, prompt.tolist(), n, temp=0.0):
        out.append(int(response.token))
        tps = response.generation_tps
    return out, tps


def teacher_forced_agreement(model, prompt: np.ndarray, continuation: list[int],
                             chunk: int) -> float:
    """Fraction of continuation tokens that are the model's top-1 given the true prefix."""

    seq = np.concatenate([prompt, np.asarray(continuation, dtype=np.int32)])
    new_sequence(model)
    cache = make_prompt_cache(model)
    model(mx.array(seq[None, :prompt.size - 1]), cache=cache)  # prefix, as generation does
    hits = []
    for start in range(prompt.size - 1, seq.size - 1, chunk):
        stop = min(seq.size - 1, start + chunk)
        logits = model(mx.array(seq[None, start:stop]), cache=cache)
        hits.append(np.array(mx.argmax(logits[0], axis=-1)) == seq[start + 1:stop + 1])
    return float(np.mean(np.concatenate(hits)))


class QualitySink:
    """Per-layer predictor quality, accumulated from (x, |h|) of the dense model."""

    def __init__(self, predictors: Predictors, target):
        self.predictors, self.target = predictors, target
        self.sums: dict[int, np.ndarray] = {}  # layer -> sums of the 5 LayerQuality numbers
        self.tokens: dict[int, int] = {}

    def __call__(self, layer: int, x: np.ndarray, mag: np.ndarray) -> None:
        """x: (T, d), mag: (T, n)."""
        pred = self.predictors.layers[layer]
        predicted = pred.scores(x) > pred.tau
        labels = target_labels(mag, self.target)
        target_mass = np.maximum(np.where(labels, mag, 0).sum(axis=1), 1e-30)
        total = np.maximum(mag.sum(axis=1), 1e-30)
        rows = np.stack([
            np.where(labels & predicted, mag, 0).sum(axis=1) / target_mass,
            np.where(predicted, mag, 0).sum(axis=1) / total,
            (labels & predicted).sum(axis=1) / np.maximum(predicted.sum(axis=1), 1),
            predicted.mean(axis=1), labels.mean(axis=1)], axis=1)  # (T, 5)
        self.sums[layer] = self.sums.get(layer, 0) + rows.sum(axis=0)
        self.tokens[layer] = self.tokens.get(layer, 0) + len(x)

    def layers(self) -> list[LayerQuality]:
        return [LayerQuality(i, *map(float, self.sums[i] / self.tokens[i]))
                for i in sorted(self.sums)]


@dataclass
class EvalInputs:
    """What dense and every flash run are scored on (from the text and the prompt file)."""

    tokens: np.ndarray  # (ppl_tokens + 1,) perplexity
    scored: np.ndarray  # (prefix + continuation + 1,) prefix perplexity
    prefix: int
    prompts: list[np.ndarray]  # greedy agreement, (L,) each
    kinds: list[str]  # per prompt


def eval_inputs(root: Path, text_file: str | Path, cfg: EvalConfig) -> EvalInputs:
    manifest = read_manifest(root)
    tokenizer = load_tokenizer(root, manifest)
    all_tokens = read_text_tokens(tokenizer, text_file)
    prefix, scored = prefix_split(all_tokens.size, cfg.prefix_tokens, cfg.continuation_tokens)
    if cfg.prompt_file:
        prompts, kinds = read_prompts(tokenizer, cfg.prompt_file)
    else:
        prompts = cut_prompts(all_tokens, cfg.prompts, cfg.prompt_tokens)
        kinds = ["text"] * len(prompts)
    return EvalInputs(all_tokens[:cfg.ppl_tokens + 1], all_tokens[:prefix + scored + 1], prefix,
                      prompts, kinds)


def _dense_part(root: Path, data: EvalInputs, cfg: EvalConfig, sink: QualitySink | None,
                progress) -> dict:
    manifest = read_manifest(root)
    # on the kernels flash runs on (fast_cpu=None: load's choice), so the two differ only
    # where flash does: a 1.5B's greedy on MLX's CPU kernels took 4x as long
    model, tokenizer = load_dense(root, dtype=cfg.dtype, fast_cpu=None)
    progress("dense perplexity")
    with numpy_linears(model):
        if sink is not None:
            with recording(model, manifest, sink):
                ppl = perplexity(model, data.tokens, data.tokens.size)
        else:
            ppl = perplexity(model, data.tokens, data.tokens.size)
        prefix_ppl = perplexity(model, data.scored, data.scored.size, data.prefix)
    runs = []
    for i, prompt in enumerate(data.prompts):
        progress(f"dense greedy {i + 1}/{len(data.prompts)}")
        runs.append(greedy(model, tokenizer, prompt, cfg.max_tokens))
    return {"ppl": ppl, "prefix_ppl": prefix_ppl, "outputs": [r[0] for r in runs],
            "tps": float(np.mean([r[1] for r in runs])) if runs else 0.0}


def _flash_part(root: Path, data: EvalInputs, dense_outputs: list[list[int]], cfg: EvalConfig,
                progress) -> dict:
    model, tokenizer = load(root, cfg.dram_budget, window=cfg.window, selector=cfg.selector,
                            oracle_rule=cfg.rule, keep=cfg.keep, dtype=cfg.dtype,
                            predictor_recall=cfg.recall, sequence_refresh=cfg.refresh)
    rt = model.flash
    chunk = rt.config.max_sparse_tokens
    try:
        progress(f"flash perplexity ({cfg.selector})")
        with numpy_linears(model):  # attention and lm_head only: FlashFFN is no nn.Linear
            ppl = perplexity(model, data.tokens, chunk)
            prefix_ppl = perplexity(model, data.scored, chunk, data.prefix)
            agreement = []
            for prompt, dense_out in zip(data.prompts, dense_outputs, strict=True):
                agreement.append(teacher_forced_agreement(model, prompt, dense_out, chunk))
        rt.stats.reset()
        runs = []
        for i, prompt in enumerate(data.prompts):
            progress(f"flash greedy {i + 1}/{len(data.prompts)} ({cfg.selector})")
            runs.append(greedy(model, tokenizer, prompt, cfg.max_tokens))
        stats = rt.stats
        texts = [(tokenizer.decode(p.tolist()), tokenizer.decode(d), tokenizer.decode(f))
                 for p, d, (f, _) in zip(data.prompts, dense_outputs, runs, strict=True)]
        summary = getattr(rt.selector, "summary", dict)()
    finally:
        rt.close()
    return {"ppl": ppl, "prefix_ppl": prefix_ppl,
            "agreement": float(np.mean(agreement)) if agreement else 1.0,
            "outputs": [r[0] for r in runs], "texts": texts,
            "tps": float(np.mean([r[1] for r in runs])) if runs else 0.0,
            "decode": decode_summary(stats, rt.manifest.n_layers),
            "settings": stats.settings, "selector": summary}


def decode_summary(stats, n_layers: int) -> dict:
    """Per decoded token: I/O, neurons (per layer), seconds by part."""
    steps = stats.decode_steps()
    totals = stats.totals()
    n = max(1, len(steps))
    return {"tokens": len(steps),
            "bytes_read_per_token": totals["bytes_read_per_token"],
            "reads_per_token": totals["reads_per_token"],
            "hit_rate": totals["hit_rate"],
            "neurons_active_per_layer": sum(s.neurons_active for s in steps) / n / n_layers,
            "neurons_loaded_per_layer": sum(s.neurons_new for s in steps) / n / n_layers,
            "seconds_per_token": totals["ffn_seconds_per_token"]}


def parse_selectors(spec: str, keep: float | None = None) -> list[tuple[str, float | None]]:
    """"sequence:0.5,quant" -> [("sequence", 0.5), ("quant", keep)]: the flash runs to score."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition(":")
        try:
            out.append((name, float(value) if value else keep))
        except ValueError as e:
            raise ValueError(f"--selector {part!r}: a keep after ':' must be a number") from e
    if not out:
        raise ValueError(f"--selector {spec!r} names no selector")
    return out


def evaluate(flash_dir: str | Path, text_file: str | Path, cfg: EvalConfig | None = None,
             progress=None) -> EvalReport:
    """Dense vs flash on one text file (see module doc). progress(str) is told each stage."""
    cfg = cfg or EvalConfig()
    return evaluate_selectors(flash_dir, text_file, cfg, [(cfg.selector, cfg.keep)],
                              progress)[0]


def evaluate_selectors(flash_dir: str | Path, text_file: str | Path, cfg: EvalConfig,
                       runs: list[tuple[str, float | None]], progress=None
                       ) -> list[EvalReport]:
    """`evaluate` for several (selector, keep) flash runs against one dense run."""
    progress = progress or (lambda stage: None)
    root = Path(flash_dir)
    manifest = read_manifest(root)
    data = eval_inputs(root, text_file, cfg)
    configs = [replace(cfg, selector=name, keep=keep) for name, keep in runs]
    for run_cfg in configs:  # refused now, not after the dense run and the runs before it
        check_selector(root, manifest, run_cfg.selector, run_cfg.rule)
    uses_predictor = [c.selector == "predictor" or (c.selector == "auto" and
                                                    bool(manifest.predictors)) for c in configs]
    sink = None
    if any(uses_predictor):
        predictors = load_predictors(root, manifest, cfg.recall)
        target = parse_target(predictors.meta.get("target", "auto"), manifest.ffn.relu_family)
        sink = QualitySink(predictors, target)
    dense = _dense_part(root, data, cfg, sink, progress)
    reports = []
    for run_cfg, predictor in zip(configs, uses_predictor, strict=True):
        mx.clear_cache()
        flash = _flash_part(root, data, dense["outputs"], run_cfg, progress)
        reports.append(_report(root, text_file, run_cfg, manifest, data, dense, flash,
                               sink if predictor else None))
    return reports


def _report(root: Path, text_file, cfg: EvalConfig, manifest, data: EvalInputs, dense: dict,
            flash: dict, sink: QualitySink | None) -> EvalReport:
    matches = [common_prefix(d, f) / cfg.max_tokens
               for d, f in zip(dense["outputs"], flash["outputs"], strict=True)]
    by_kind = {kind: float(np.mean([m for m, k in zip(matches, data.kinds, strict=True)
                                    if k == kind])) for kind in dict.fromkeys(data.kinds)}
    predictor_s = flash["decode"]["seconds_per_token"].get("predictor", 0.0)
    return EvalReport(
        model=str(root), text=str(text_file),
        settings={**asdict(cfg), **flash["settings"],
                  "predictors": manifest.predictors and {
                      k: manifest.predictors.get(k) for k in ("kind", "target", "recall",
                                                              "rank", "size")}},
        ppl_tokens=int(data.tokens.size - 1), dense_ppl=dense["ppl"], flash_ppl=flash["ppl"],
        greedy_match=float(np.mean(matches)) if matches else 1.0,
        token_agreement=flash["agreement"], prefix_tokens=data.prefix,
        continuation_tokens=int(data.scored.size - 1 - data.prefix),
        dense_prefix_ppl=dense["prefix_ppl"], flash_prefix_ppl=flash["prefix_ppl"],
        greedy_match_by_kind=by_kind, dense_tokens_per_s=dense["tps"],
        flash_tokens_per_s=flash["tps"], decode=flash["decode"],
        predictor_time_share=predictor_s * flash["tps"], selector=flash["selector"],
        layers=sink.layers() if sink is not None else [],
        samples=[{"prompt": p, "dense": d, "flash": f} for p, d, f in flash["texts"]])


@dataclass
class SweepPoint:
    recall: float  # the predictors' operating point
    predicted: float  # neurons kept per token, fraction (mean over layers and tokens)
    mass_kept: float  # sum|h| kept / sum|h| (mean)
    ppl: float  # dense model whose FFNs keep only the predicted neurons
    oracle_ppl: float  # ... keep each token's true top neurons, as many as predicted


def sweep(flash_dir: str | Path, text_file: str | Path, ppl_tokens: int = 256,
          recalls: list[float] | None = None, progress=None) -> tuple[float, list[SweepPoint]]:
    """Perplexity vs operating point, without flash: the dense model with each FFN restricted
    to the neurons the predictors pick, at every recall they were calibrated for, next to the
    oracle keeping the same number of true top-|h| neurons per token.

    This is flash's fidelity with compute_on="active" and caches that hold every neuron, at
    ~10 s per point instead of minutes. Returns (dense perplexity, points).
    """

    progress = progress or (lambda stage: None)
    root = Path(flash_dir)
    manifest = read_manifest(root)
    predictors = load_predictors(root, manifest)
    model, tokenizer = load_dense(root, dtype="float32")
    tokens = read_text_tokens(tokenizer, text_file)[:ppl_tokens + 1]
    with numpy_linears(model):
        dense = perplexity(model, tokens, tokens.size)
        points = [_sweep_point(model, manifest, predictors, tokens, r, progress)
                  for r in (recalls or sorted(predictors.layers[0].taus))]
    return dense, points


def _sweep_point(model, manifest, predictors: Predictors, tokens: np.ndarray, recall: float,
                 progress) -> SweepPoint:
    progress(f"sweep recall {recall}")
    predictors.use_recall(recall)
    seen: list[tuple[float, float]] = []
    counts: dict[int, np.ndarray] = {}

    def predicted(layer: int, x: np.ndarray, mag: np.ndarray) -> np.ndarray:
        keep = predictors.layers[layer].scores(x) > predictors.layers[layer].tau
        counts[layer] = keep.sum(axis=1)
        total = np.maximum(mag.sum(axis=1), 1e-30)
        seen.append((float(keep.mean()), float(np.mean(np.where(keep, mag, 0).sum(1) / total))))
        return keep

    def oracle(layer: int, x: np.ndarray, mag: np.ndarray) -> np.ndarray:
        k = np.maximum(counts[layer], 1)[:, None]  # (T, 1) as many as predicted
        ranks = np.argsort(np.argsort(-mag, axis=1), axis=1)
        return ranks < k

    with recording(model, manifest, predicted):
        ppl = perplexity(model, tokens, tokens.size)
    with recording(model, manifest, oracle):
        oracle_ppl = perplexity(model, tokens, tokens.size)
    frac, mass = np.mean(seen, axis=0)
    return SweepPoint(recall, float(frac), float(mass), ppl, oracle_ppl)


def format_sweep(dense: float, points: list[SweepPoint]) -> str:
    lines = [f"dense perplexity {dense:.3f}",
             f"{'recall':>7} {'neurons':>8} {'mass':>6} {'ppl':>8} {'oracle ppl':>11}"]
    lines += [f"{p.recall:>7} {p.predicted:>8.1%} {p.mass_kept:>6.3f} {p.ppl:>8.3f} "
              f"{p.oracle_ppl:>11.3f}" for p in points]
    return "\n".join(lines)


def format_report(report: EvalReport) -> str:
    """A human-readable summary of an EvalReport."""
    d = report.decode
    lines = [
        f"model {report.model}  text {report.text}  selector {report.settings.get('selector')}",
        f"perplexity over {report.ppl_tokens} tokens: dense {report.dense_ppl:.3f}, flash "
        f"{report.flash_ppl:.3f} ({report.flash_ppl / report.dense_ppl - 1:+.1%})",
        f"prefix perplexity ({report.prefix_tokens} prompt tokens, the next "
        f"{report.continuation_tokens} scored): dense {report.dense_prefix_ppl:.3f}, flash "
        f"{report.flash_prefix_ppl:.3f} "
        f"({report.flash_prefix_ppl / report.dense_prefix_ppl - 1:+.1%})",
        f"greedy: match before first difference {report.greedy_match:.1%} ("
        + ", ".join(f"{k} {v:.1%}" for k, v in report.greedy_match_by_kind.items())
        + f"), teacher-forced top-1 agreement {report.token_agreement:.1%}",
        f"decode: dense {report.dense_tokens_per_s:.2f} tok/s, flash "
        f"{report.flash_tokens_per_s:.2f} tok/s; {d['bytes_read_per_token'] / 2**20:.2f} MiB "
        f"and {d['reads_per_token']:.0f} reads per token; per layer "
        f"{d['neurons_active_per_layer']:.0f} neurons active, "
        f"{d['neurons_loaded_per_layer']:.0f} loaded; hit rate {d['hit_rate']:.1%}",
        f"predictor time share {report.predictor_time_share:.1%} of decode",
    ]
    if report.selector:
        sel = report.selector
        lines.append(f"sequence set: {sel['set_fraction']:.1%} of each layer (keep "
                     f"{sel['keep']}), {sel['grown_neurons']} neurons added by later prompts, "
                     f"{sel['capped_layers']} layers capped to the cache, {sel['refreshes']} "
                     "refreshes")
    if report.layers:
        lines.append(f"{'layer':>5} {'recall':>7} {'mass':>6} {'prec':>6} {'pred':>6} "
                     f"{'target':>6}")
        lines += [f"{q.layer:>5} {q.recall:>7.3f} {q.mass_kept:>6.3f} {q.precision:>6.3f} "
                  f"{q.predicted:>6.1%} {q.target_size:>6.1%}" for q in report.layers]
        lines.append(f"{'mean':>5} {np.mean([q.recall for q in report.layers]):>7.3f} "
                     f"{np.mean([q.mass_kept for q in report.layers]):>6.3f} "
                     f"{np.mean([q.precision for q in report.layers]):>6.3f} "
                     f"{np.mean([q.predicted for q in report.layers]):>6.1%} "
                     f"{np.mean([q.target_size for q in report.layers]):>6.1%}")
    return "\n".join(lines)
