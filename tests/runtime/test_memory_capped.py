"""A DRAM budget is a promise: under a cgroup memory cap equal to the budget, a budget just
above the plan's minimum loads and generates without being killed, and one just below is
refused up front with the breakdown (never exit 137). Plus the plan's KV and prefill terms."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_flash.runtime import loader
from mlx_flash.runtime.memory import KV_STEP, kv_bytes, prefill_bytes

CGROUP = Path("/sys/fs/cgroup/memory")
# options that leave the fit one choice, so min_budget is the exact threshold
OPTIONS = dict(dtype="float32", resident_bits=16, embed_on_flash=False, max_kv_tokens=64)

CHILD = f"""
import sys
from mlx_flash import load
from mlx_flash.runtime.generate import generate_text
from mlx_flash.runtime.loader import min_budget

OPTIONS = {OPTIONS!r}
if sys.argv[1] == "plan":  # the threshold, and the mapped file pages its runtime counts
    need = min_budget(sys.argv[2], **OPTIONS)
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    print(need, int(status["RssFile"].split()[0]) * 1024)
    sys.exit(0)
try:
    model, tokenizer = load(sys.argv[2], dram_budget=int(sys.argv[1]), **OPTIONS)
except ValueError as e:
    print(e, file=sys.stderr)
    sys.exit(3)
result = generate_text(model, tokenizer, [5, 6, 7, 8], 8)
model.flash.close()
print(result.generation_tokens)
"""


def test_kv_reserve_is_what_the_caches_allocate():
    config = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  hidden_size=64)
    one_step = 2 * 3 * 2 * 16 * KV_STEP * 4  # k and v, layers + one growing copy, f32
    assert kv_bytes(config, 1, 4) == kv_bytes(config, KV_STEP, 4) == one_step
    assert kv_bytes(config, KV_STEP + 1, 4) == 2 * one_step
    # a prefill pass: its positions' activations and one position's logits, not all of them
    small = dict(hidden_size=64, num_attention_heads=4, vocab_size=1000)
    assert prefill_bytes(small, 10, 32) == 4 * (10 * (8 * 64 + 4 * 10 + 2 * 32) + 1000)
    assert prefill_bytes(small, 20, 32) > prefill_bytes(small, 10, 32)


def _cgroup_or_skip() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a cgroup")
    if not (CGROUP / "memory.limit_in_bytes").exists():
        pytest.skip(f"needs a cgroup v1 memory controller at {CGROUP}")


def _run_capped(cap: int, *args: str) -> tuple[subprocess.CompletedProcess, int]:
    """The child under a memory cgroup capped at `cap` bytes; (its result, peak usage)."""
    group = CGROUP / f"mlx_flash_test_{os.getpid()}_{cap}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(cap))
        procs = str(group / "cgroup.procs")
        done = subprocess.run(
            [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=300,
            preexec_fn=lambda: Path(procs).write_text(str(os.getpid())))
        return done, int((group / "memory.max_usage_in_bytes").read_text())
    finally:
        group.rmdir()


def test_a_budget_holds_under_a_cgroup_cap(tiny_dirs):
    _cgroup_or_skip()
    _, flash_dir = tiny_dirs("llama")
    probe = subprocess.run([sys.executable, "-c", CHILD, "plan", str(flash_dir)],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    need, mapped = (int(x) for x in probe.stdout.split()[-2:])
    above = need + (4 << 20)  # a process's RSS varies by ~1-2 MiB from run to run
    # The plan's runtime is RSS, mapped library pages included; this machine's page cache
    # holds them already, charged to other groups, so the cap leaves them out: what the child
    # is charged for (its heap, MLX's buffers, new page cache) must fit the rest.
    cap = above - mapped
    done, peak = _run_capped(cap, str(above), str(flash_dir))
    assert done.returncode == 0, f"exit {done.returncode} under a cap of {cap} B: {done.stderr}"
    assert done.stdout.split()[-1] == "8" and peak <= cap
    below = need - (8 << 20)
    done, _ = _run_capped(below, str(below), str(flash_dir))
    assert done.returncode == 3, f"exit {done.returncode} (137: killed): {done.stderr}"
    assert "too small" in done.stderr and "runtime" in done.stderr and "scratch" in done.stderr


def test_a_far_too_small_budget_is_refused_before_the_tokenizer(tiny_dirs, monkeypatch):
    _, flash_dir = tiny_dirs("llama")

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the budget was checked")

    monkeypatch.setattr(loader, "load_tokenizer", no_tokenizer)
    with pytest.raises(ValueError, match="too small.*runtime"):
        loader.load(flash_dir, dram_budget="10MiB", **OPTIONS)
    with pytest.raises(ValueError, match="too small.*runtime"):
        loader.check_budget_early(flash_dir, "10MiB", **OPTIONS)
    loader.check_budget_early(flash_dir, "16GB", **OPTIONS)  # a budget that fits: no error
