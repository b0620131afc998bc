"""What runs inside a contender's child process: load, generate, measure, write the result.

    python -m mlx_flash.bench.worker SPEC.json

The harness writes SPEC.json (`harness.worker_spec`) and starts this module inside the run's
memory cgroup; it writes its result JSON to the spec's `result_file`, whatever happens.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import mlx.core as mx
import mlx_lm  # noqa: F401  (the baseline RSS includes MLX and mlx_lm)
import numpy as np

from ..format.manifest import read_manifest
from ..format.storage import write_text_atomic
from ..runtime.generate import generate_step
from ..runtime.loader import check_budget_early, load, load_dense, load_tokenizer
from ..runtime.tokenizer import DECODE_TABLE_RSS
from ..spec.drafter import drafter_bytes, load_drafter
from ..spec.speculative import SpecSettings, speculative_tokens
from .baselines import load_mmap, use_unbundled
from .perplexity import CHUNK, llama_nll, mlx_nll, perplexity


def rss_bytes() -> int:
    """Resident set size of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def disk_read_bytes() -> int:
    """Bytes this process made the block layer read (page faults, buffered and direct I/O)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Clock:
    """Timestamps of each generated token plus process counters at the first and last one."""

    def __init__(self, probe=None):
        self.t0, self.times, self.probe = time.perf_counter(), [], probe or (lambda: 0.0)
        self.first: dict = {}
        self.last: dict = {}

    def _counters(self) -> dict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {"t": time.perf_counter(), "disk": disk_read_bytes(), "majflt": usage.ru_majflt,
                "probe": self.probe()}

    def tick(self) -> None:
        counters = self._counters()
        self.times.append(counters["t"] - self.t0)
        if len(self.times) == 1:
            self.first = counters
        self.last = counters

    def per_token(self, key: str) -> float:
        """A counter's growth per token over tokens 2..N."""
        n = len(self.times) - 1
        return (self.last[key] - self.first[key]) / n if n > 0 else 0.0

    def summary(self) -> dict:
        """Decode rate over tokens 2..N (the first token carries the prompt)."""
        n = len(self.times) - 1
        span = self.last.get("t", 0.0) - self.first.get("t", 0.0)
        return {"ttft_s": self.times[0] if self.times else None,
                "decode_tps": n / span if span > 0 else None,
                "ms_per_token": 1e3 * span / n if n > 0 else None,
                "disk_bytes_per_token": self.per_token("disk"),
                "major_faults_per_token": self.per_token("majflt"),
                "probe_s_per_token": self.per_token("probe"), "token_times_s": self.times}


def greedy(logprobs: mx.array) -> mx.array:
    """The sampler of every run: the most likely token."""
    return mx.argmax(logprobs, axis=-1)


def enough(clock: Clock, done: int, tokens: int, max_decode_s: float | None) -> bool:
    """Stop decoding: `tokens` reached, or (with max_decode_s) two or more tokens decoded and
    more than max_decode_s seconds since the first (a thrashing cell's rate is known by then)."""
    if done >= tokens:
        return True
    return bool(max_decode_s) and done >= 3 and clock.last["t"] - clock.first["t"] > max_decode_s


def generate_mlx(model, prompt_ids: list[int], tokens: int, probe=None,
                 drafter=None, max_decode_s: float | None = None) -> tuple[list, Clock]:
    """Greedy decode of `tokens` tokens with mlx-flash's generate_step (mlx_lm's loop, no
    logits for the prompt's other positions; no EOS stop), or
    speculatively with `drafter` (the same greedy tokens, several per verification); fewer
    when decoding passes max_decode_s (`enough`)."""
    clock, out = Clock(probe), []
    if drafter is None:
        stream = (token for token, _ in generate_step(mx.array(prompt_ids), model, greedy))
    else:
        stream = speculative_tokens(model, drafter, prompt_ids, SpecSettings())
    for token in stream:
        out.append(int(token))
        clock.tick()
        if enough(clock, len(out), tokens, max_decode_s):
            break
    return out, clock


# ---------------------------------------------------------------- recorded selections


class RecordingSelector:
    """Wraps a selector and keeps every call's active ids (for the window sweep)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []  # calls: (layer, [ids per token])

    def select(self, layer, x):
        selection = self.inner.select(layer, x)
        self.calls.append((layer, [ids.astype("int32") for ids in selection.ids]))
        return selection

    def __getattr__(self, name):
        return getattr(self.inner, name)


def save_calls(path: Path, calls: list) -> None:
    """Write [(layer, [ids (k,) int32 per token])] in call order to an .npz file."""
    arrays = {f"c{i}_l{layer}_t{t}": ids for i, (layer, per_token) in enumerate(calls)
              for t, ids in enumerate(per_token)}
    np.savez_compressed(path, **arrays)


def load_calls(path: Path) -> list[tuple[int, list]]:
    """Inverse of save_calls: [(layer, [ids per token])] in call order."""
    with np.load(path) as data:
        keys = sorted(data.files, key=lambda k: tuple(int(p[1:]) for p in k.split("_")))
        calls: dict[int, tuple[int, list]] = {}
        for key in keys:
            c, layer, _ = (int(p[1:]) for p in key.split("_"))
            calls.setdefault(c, (layer, []))[1].append(data[key])
    return [calls[c] for c in sorted(calls)]


# ---------------------------------------------------------------- the contenders' runs


def flash_result(model) -> dict:
    """Per decoded token averages from model.flash.stats (the first decode step excluded)."""
    stats = model.flash.stats
    steps = [s for s in stats.steps if s.tokens == 1][1:]
    n = max(1, len(steps))
    seconds = {k: sum(s.seconds[k] for s in steps) / n for k in ("predictor", "io", "memory",
                                                                 "compute")}
    return {"flash_seconds_per_token": seconds,
            "bytes_read_per_token": sum(s.bytes_read for s in steps) / n,
            "bytes_needed_per_token": sum(s.bytes_needed for s in steps) / n,
            "read_amplification": _ratio(sum(s.bytes_read for s in steps),
                                         sum(s.bytes_needed for s in steps)),
            "predictor_bytes_per_token": sum(s.predictor_bytes for s in steps) / n,
            "reads_per_token": sum(s.reads for s in steps) / n,
            "hit_rate": sum(s.neurons_hit for s in steps) / max(1, sum(s.neurons_active
                                                                       for s in steps)),
            "truncated_per_token": sum(s.truncated for s in steps) / n,
            "settings": {k: str(v) for k, v in stats.settings.items()},
            "memory_plan": stats.memory}


def _ratio(num: float, den: float) -> float | None:
    """num / den, or None when nothing was needed (naive streaming counts no needed bytes)."""
    return num / den if den else None


def load_flash(spec: dict):
    """load() a flash contender from worker args; returns the model (with `bench_drafter`
    set when the options ask for the dir's drafter: its DRAM is reserved in the budget)."""
    opts = dict(spec["options"])
    unbundled = opts.pop("unbundled", False)
    model_dir = opts.pop("model_dir", spec["model"])  # a placed copy (issue 9)
    with_drafter = opts.pop("drafter", False) and spec.get("task", "generate") == "generate"
    if spec.get("force_direct"):
        opts["direct"] = True
    if "max_kv_tokens" in opts and spec.get("task") == "ppl":  # the text is the context
        opts["max_kv_tokens"] = max(opts["max_kv_tokens"], len(spec["ppl_ids"]))
    if with_drafter:
        opts["reserve"] = drafter_bytes(model_dir, read_manifest(model_dir).config["hidden_size"])
    # as `mlx-flash generate` runs: a budget far too small is refused before the tokenizer's
    # parse, and the prompt is token ids already, so the tokenizer keeps only its decoding
    # table before the plan is made
    check_budget_early(model_dir, spec["cap"], tokenizer_rss=DECODE_TABLE_RSS,
                       dtype=spec["dtype"], **opts)
    tokenizer = load_tokenizer(Path(model_dir), read_manifest(model_dir))
    tokenizer.drop_encoder()
    model, _ = load(model_dir, dram_budget=spec["cap"], dtype=spec["dtype"],
                    tokenizer=tokenizer, **opts)
    model.bench_drafter = (load_drafter(model_dir, model_dir).attach(model, model_dir)
                           if with_drafter else None)
    if unbundled:
        use_unbundled(model, spec["model"], spec["unbundled_dir"])
    if spec.get("record_ids"):
        model.flash.selector = RecordingSelector(model.flash.selector)
    return model


def load_contender(spec: dict):
    """(model, probe): the dense, mmap or flash model of `spec`; probe times the mmap FFNs."""
    kind, probe = spec["kind"], None
    if kind == "dense":
        model, _ = load_dense(spec["model"], dtype=spec["dtype"], **spec["options"])
    elif kind == "mmap":
        model, _ = load_mmap(spec["model"], dtype=spec["dtype"], **spec["options"])
        layers = [layer.mlp for layer in model.layers]
        probe = lambda: sum(m.seconds for m in layers)  # noqa: E731
    else:
        model = load_flash(spec)
    return model, probe


def run_mlx_worker(spec: dict, result: dict) -> None:
    """dense / mmap / flash: load, generate, fill `result`."""
    result["baseline_rss_bytes"] = rss_bytes()
    spec = dict(spec, options=dict(spec["options"]))
    os.environ.update(spec["options"].pop("env", {}))  # e.g. MLX_FLASH_CPU_BLOCKS=0
    t0 = time.perf_counter()
    try:
        model, probe = load_contender(spec)
    except ValueError as e:  # load() refusing a budget too small is a result
        result.update(status="refused", error=str(e))
        return
    result["load_s"] = time.perf_counter() - t0
    result["rss_after_load_bytes"] = rss_bytes()
    if spec.get("task") == "ppl":
        result.update(ppl_result(mlx_nll(model, spec["ppl_ids"], ppl_chunk(model))))
        if spec["kind"] == "flash":
            model.flash.close()
        return
    drafter = getattr(model, "bench_drafter", None)
    out, clock = generate_mlx(model, spec["prompt_ids"], spec["tokens"], probe, drafter,
                              spec.get("max_decode_s"))
    result.update(clock.summary(), tokens_out=out, drafter=drafter is not None)
    if spec["kind"] == "mmap":
        result["ffn_unsplit_s_per_token"] = result["probe_s_per_token"]
    if spec["kind"] == "flash":
        result.update(flash_result(model))
        if spec.get("record_ids"):
            save_calls(Path(spec["ids_file"]), model.flash.selector.calls)
            result["ids_file"] = spec["ids_file"]
        model.flash.close()


def ppl_chunk(model) -> int:
    """Tokens per forward pass of a contender's perplexity: a flash model whose selector keeps
    fewer than every neuron is fed decode-sized calls (`max_sparse_tokens`), so each token is
    scored with the neurons its own selection kept, as when it decodes; the rest in 128s."""
    flash = getattr(model, "flash", None)
    if flash is None or getattr(flash.selector, "fixed", False):
        return CHUNK
    return flash.config.max_sparse_tokens


def ppl_result(nll: np.ndarray) -> dict:
    """The perplexity fields of a result from (T,) negative log-likelihoods."""
    return {"ppl": perplexity(nll), "ppl_tokens": int(nll.size), "nll_mean": float(nll.mean())}


def run_llama_worker(spec: dict, result: dict) -> None:
    """llama.cpp on the GGUF, mmap'd, greedy, same prompt token ids; or (task "ppl") the
    perplexity of spec["ppl_ids"] from its own logits."""
    import llama_cpp  # optional: only this contender needs llama-cpp-python

    result["baseline_rss_bytes"] = rss_bytes()
    result["llama_cpp_version"] = getattr(llama_cpp, "__version__", "?")
    ppl = spec.get("task") == "ppl"
    n_ctx = len(spec["ppl_ids"]) + 8 if ppl else len(spec["prompt_ids"]) + spec["tokens"] + 16
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["options"]["gguf"], n_ctx=max(512, n_ctx),
                          n_threads=spec["options"].get("n_threads") or os.cpu_count(),
                          use_mmap=True, use_mlock=False, logits_all=ppl, verbose=False, seed=0)
    result["load_s"] = time.perf_counter() - t0
    result["rss_after_load_bytes"] = rss_bytes()
    if ppl:
        result.update(ppl_result(llama_nll(llm, spec["ppl_ids"])))
        return
    clock, out = Clock(), []
    for token in llm.generate(spec["prompt_ids"], temp=0.0, top_k=1, top_p=1.0,
                              repeat_penalty=1.0, reset=True):
        out.append(int(token))
        clock.tick()
        if enough(clock, len(out), spec["tokens"], spec.get("max_decode_s")):
            break
    result.update(clock.summary(), tokens_out=out)


def worker_main(spec_file: str) -> int:
    """Run the contender of `spec_file` and write its result JSON (atomically)."""
    spec = json.loads(Path(spec_file).read_text())
    result: dict = {"status": "ok"}
    try:
        if spec["kind"] == "llama_cpp":
            run_llama_worker(spec, result)
        else:
            run_mlx_worker(spec, result)
    except Exception as e:  # noqa: BLE001  (reported in the table, the benchmark goes on)
        result.update(status="error", error=f"{type(e).__name__}: {e}",
                      traceback=traceback.format_exc()[-3000:])
    # The kernel's high-water mark and statm's current RSS come from per-thread counters that
    # are synced lazily (a few pages apart): the peak is at least every RSS this worker sampled.
    result["peak_rss_bytes"] = max(peak_rss(), rss_bytes(), result.get("baseline_rss_bytes", 0))
    write_text_atomic(spec["result_file"], json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry of the child process: `python -m mlx_flash.bench.worker SPEC.json`."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m mlx_flash.bench.worker SPEC.json (written by the benchmark)",
              file=sys.stderr)
        return 2
    return worker_main(argv[0])


if __name__ == "__main__":
    sys.exit(main())
