"""`mlx-flash chat` on a tiny model: through a pseudo terminal, and its conversation in-process."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path

import pytest
from mlx_lm import generate

import mlx_flash
from mlx_flash.cli.chat import Conversation, Status, StatusBar
from mlx_flash.runtime.generate import conversation_ids

ROOT = Path(__file__).resolve().parents[2]
STATUS_DRAW = re.compile(r"\x1b7.*?\x1b8", re.DOTALL)  # save cursor .. restore cursor
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def flash_dir(tiny_dirs):
    return tiny_dirs("llama")[1]  # llama: its tiny word-level tokenizer round-trips


def greedy(flash_dir, messages: list[dict], max_tokens: int) -> str:
    model, tokenizer = mlx_flash.load(flash_dir)
    ids = conversation_ids(tokenizer, messages)
    return generate(model, tokenizer, prompt=ids, max_tokens=max_tokens)


def test_chat_in_a_terminal_answers_and_shows_the_status_line(flash_dir):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, TERM="xterm", PYTHONPATH=str(ROOT))
    child = pexpect.spawn(sys.executable, ["-m", "mlx_flash", "chat", "--model", str(flash_dir),
                                           "--max-tokens", "8"],
                          cwd=str(ROOT), env=env, dimensions=(24, 120), encoding="utf-8",
                          timeout=60)
    try:
        child.expect(">>> ")
        child.sendline("w1 w2 w3")
        child.expect(">>> ")
        turn = child.before
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, turn
    draws = STATUS_DRAW.findall(turn)
    assert draws, f"no status line was drawn: {turn!r}"
    last = ANSI.sub("", draws[-1])
    for field in ("DRAM", "MiB", "hit", "tok/s", "kv 11 tok"):  # 3 prompt + 8 answer tokens
        assert field in last, last
    answer = ANSI.sub("", STATUS_DRAW.sub("", turn)).replace("\r", "")
    expected = greedy(flash_dir, [{"role": "user", "content": "w1 w2 w3"}], 8)
    assert expected in answer, answer


def test_second_turn_reuses_the_kv_cache_and_equals_a_fresh_run(flash_dir):
    model, tokenizer = mlx_flash.load(flash_dir)
    chat = Conversation(model, tokenizer)
    first = "".join(r.text for r in chat.ask("w1 w2 w3", max_tokens=6))
    responses = list(chat.ask("w7 w8", max_tokens=6))
    second = "".join(r.text for r in responses)
    messages = [{"role": "user", "content": "w1 w2 w3"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "w7 w8"}]
    full = conversation_ids(tokenizer, messages)
    assert responses[0].prompt_tokens < len(full)  # only the new tokens were fed
    assert second == greedy(flash_dir, messages, 6)
    assert chat.kv_tokens >= len(full)


def test_reset_starts_a_new_conversation(flash_dir):
    model, tokenizer = mlx_flash.load(flash_dir)
    chat = Conversation(model, tokenizer, system_prompt="w5")
    list(chat.ask("w1 w2", max_tokens=3))
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "w5"}] and chat.kv_tokens == 0


def test_status_line_and_plain_output():
    status = Status(dram_used=300 << 20, dram_budget=1 << 30, bytes_read=3 << 19, reads=42,
                    hit_rate=0.875, tokens_per_second=1.5, kv_tokens=57)
    line = status.line()
    assert line == ("DRAM 300/1024 MiB | read 1.50 MiB/tok in 42 reads | hit 87.5% | "
                    "1.5 tok/s | kv 57 tok")
    out = io.StringIO()  # not a terminal: one plain line per reply, nothing per token
    with StatusBar(out) as bar:
        bar.show(line)
        bar.final(line)
    assert out.getvalue() == f"[{line}]\n"
