"""The lean generate path: a tokenizer without transformers, mlx_lm's decode loop without
mlx_lm.generate, and mlx_lm's package __init__ deferred until something needs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import load_dense
from mlx_flash.runtime.generate import format_prompt, generate_step, log_softmax, stream_generate
from mlx_flash.runtime.tokenizer import FlashTokenizer, load_tokenizer

# a ChatML template in the style of Qwen's (system default, loop, generation prompt)
CHATML = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + "
          "messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\n"
          "You are helpful.<|im_end|>\\n' }}{%- endif %}\n"
          "{%- for message in messages %}{%- if message.role != 'system' %}"
          "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
          "{%- endif %}{%- endfor %}\n"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n")


def _with_template(flash_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tokenizer files of `flash_dir` whose config has the ChatML template."""
    out = tmp_path / "tok"
    out.mkdir()
    (out / "tokenizer.json").write_bytes((flash_dir / "tokenizer.json").read_bytes())
    config = json.loads((flash_dir / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHATML}))
    return out


def test_the_tokenizer_matches_transformers(tiny_dirs, tmp_path):
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")  # transformers' tokenizer, for reference
    _, flash_dir = tiny_dirs("qwen2")
    root = _with_template(flash_dir, tmp_path)
    ours, theirs = load_tokenizer(root, [1]), mlx_lm_utils.load_tokenizer(root)
    text = "w1 w2 w3 w10 w1"
    assert ours.encode(text) == list(theirs.encode(text))
    ids = ours.encode(text)
    assert ours.decode(ids) == theirs.decode(ids)
    assert ours.eos_token_id == theirs.eos_token_id and 1 in ours.eos_token_ids
    vocab = ours.get_vocab()  # looked up per token; the same mapping as transformers'
    assert dict(vocab) == theirs.get_vocab() and len(vocab) == len(theirs.get_vocab())
    assert "w1" in vocab and "not-a-token" not in vocab and 7 not in vocab
    with pytest.raises(KeyError):
        vocab["not-a-token"]
    messages = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"},
                {"role": "user", "content": "w4"}]
    for prompt in (True, False):
        assert ours.apply_chat_template(messages, add_generation_prompt=prompt,
                                        tokenize=False) == \
            theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=True) == \
        list(theirs.apply_chat_template(messages, add_generation_prompt=True))


def test_the_chat_template_and_its_errors(tiny_dirs, tmp_path):
    _, flash_dir = tiny_dirs("qwen2")
    plain = load_tokenizer(flash_dir)
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "w1"}])
    assert format_prompt(plain, "w1 w2") == plain.encode("w1 w2")  # no template: plain text
    chat = load_tokenizer(_with_template(flash_dir, tmp_path))
    text = chat.apply_chat_template([{"role": "system", "content": "S"},
                                     {"role": "user", "content": "U"}],
                                    add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
                    "<|im_start|>assistant\n")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        FlashTokenizer(tmp_path)


def test_streamed_segments_add_up_to_the_decoded_text(tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    tok = load_tokenizer(flash_dir)
    ids = tok.encode("w1 w2 w3 w4 w5 w6")
    detok = tok.detokenizer
    pieces = []
    for i in ids:
        detok.add_token(i)
        pieces.append(detok.last_segment)
    detok.finalize()
    pieces.append(detok.last_segment)
    assert "".join(pieces) == tok.decode(ids) and detok.tokens == ids


def test_log_softmax_is_mlxs_in_the_logits_dtype():
    logits = mx.array(np.random.default_rng(0).normal(0, 8, (2, 5000)).astype(np.float32))
    want = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(log_softmax(logits)), np.asarray(want), atol=2e-5)
    half = log_softmax(logits.astype(mx.float16))
    assert half.dtype == mx.float16 and half.shape == logits.shape
    np.testing.assert_allclose(np.asarray(half.astype(mx.float32)), np.asarray(want), atol=0.1)


def test_our_decode_loop_gives_mlx_lms_tokens(tiny_dirs):
    mlx_lm = pytest.importorskip("mlx_lm")
    _, flash_dir = tiny_dirs("qwen2")
    model, tok = load_dense(flash_dir)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    ours = list(stream_generate(model, tok, prompt, max_tokens=8))
    theirs = list(mlx_lm.stream_generate(model, tok, prompt, max_tokens=8))  # our tokenizer
    assert [r.token for r in ours] == [r.token for r in theirs]
    assert "".join(r.text for r in ours) == "".join(r.text for r in theirs)
    assert [r.finish_reason for r in ours] == [r.finish_reason for r in theirs]
    for a, b in zip(ours[:-1], theirs[:-1], strict=True):  # the logprobs too (numpy on CPU)
        np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)
    # a prompt longer than one prefill chunk gives the same tokens as one pass
    chunked = list(stream_generate(model, tok, mx.array(prompt * 3), max_tokens=4))
    steps = generate_step(mx.array(prompt * 3), model, lambda x: mx.argmax(x, axis=-1),
                          prefill_step=4)
    small = [next(steps)[0] for _ in range(4)]
    assert small == [r.token for r in chunked]


GENERATE_CHILD = """
import sys
import mlx_flash
from mlx_flash.cli.main import main
assert main(["generate", "--model", sys.argv[1], "--max-tokens", "3", "--prompt", "w1 w2"]) == 0
print("transformers" in sys.modules, "mlx_lm.generate" in sys.modules, file=sys.stderr)
from mlx_lm import generate   # the deferred package still gives mlx_lm's names
print(callable(generate), "transformers" in sys.modules, file=sys.stderr)
"""


def test_generate_never_imports_transformers(tiny_dirs):
    pytest.importorskip("transformers")  # else there is nothing to keep out
    _, flash_dir = tiny_dirs("qwen2")
    done = subprocess.run([sys.executable, "-c", GENERATE_CHILD, str(flash_dir)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-2:] == ["False False", "True True"], done.stderr


def _byte_level_dir(tmp_path: Path) -> Path:
    """A tiny byte-level BPE tokenizer (GPT-2 / Qwen style) with a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x * 2  # héllo 世界", "print('ok') 🙂"] * 20,
                            trainer)
    out = tmp_path / "bpe"
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end|>"}))
    return out


def test_dropping_the_encoder_decodes_the_same(tmp_path):
    root = _byte_level_dir(tmp_path)
    full, lean = load_tokenizer(root), load_tokenizer(root)
    assert lean.drop_encoder() and lean.drop_encoder()  # a second call keeps the table
    rng = np.random.default_rng(0)
    samples = [full.encode("def f(x): return 'héllo 世界' 🙂<|end|>")]
    samples += [list(rng.integers(0, len(full), size=int(rng.integers(1, 9)))) for _ in range(300)]
    for ids in samples:  # random ids split UTF-8 characters: both replace them alike
        for skip in (False, True):
            assert lean.decode(ids, skip) == full.decode(ids, skip), ids
    assert lean.eos_token_id == full.eos_token_id and len(lean) == len(full)
    detok = lean.detokenizer
    for i in samples[0]:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == full.decode(samples[0])
    with pytest.raises(RuntimeError, match="drop_encoder"):
        lean.encode("x")


def test_a_word_level_tokenizer_keeps_its_encoder(tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    tok = load_tokenizer(flash_dir)
    assert not tok.drop_encoder() and tok.encode("w1") == [4]
