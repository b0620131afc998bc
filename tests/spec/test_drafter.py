"""The recurrent drafter and speculative decoding: exact greedy output, tree attention, rollback."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import KVCache

import mlx_flash.accel.build as accel_build
from mlx_flash.format.errors import FormatError
from mlx_flash.offline.train_drafter import (
    DrafterConfig,
    loss_and_grads,
    make_examples,
    train_drafter,
)
from mlx_flash.runtime.loader import load_dense
from mlx_flash.spec.drafter import (
    Drafter,
    drafter_bytes,
    hidden_and_logits,
    init_params,
    load_drafter,
    save_drafter,
)
from mlx_flash.spec.speculative import (
    SpecSettings,
    SpecStats,
    TokenTree,
    accept,
    make_cache,
    rollback,
    speculative_tokens,
    token_tree,
    verify_tree,
)

PROMPT = [5, 9, 17, 33, 65, 129, 7, 8]
N_TOKENS = 24


def reference(model, n=N_TOKENS) -> list[int]:
    """mlx_lm's own greedy tokens (what `mlx_lm.generate` emits)."""
    steps = generate_step(mx.array(PROMPT), model, max_tokens=n)
    return [int(t) for t, _ in steps]


def random_drafter(model, model_dir, d=64, seed=1) -> Drafter:
    return Drafter(init_params(d, 1, seed=seed), np.arange(256)).attach(model, model_dir)


class PeekingDrafter:
    """Drafts that hold the true continuation in a beam that is not the first, plus decoys
    sharing its prefix: acceptance paths are then long and non-contiguous in the tree."""

    def __init__(self, truth: list[int], emitted: list[int]):
        self.truth, self.emitted = truth, emitted

    def beam_search(self, h, token, width, length):
        pos = len(self.emitted)
        true = list(self.truth[pos:pos + length])
        true += [3] * (length - len(true))
        decoy = [true[0]] + [(t + 1) % 256 for t in true[1:]]
        other = [(true[0] + 7) % 256] * length
        return np.array([decoy, true, other][:max(2, width)])


def run(model, drafter, settings, n=N_TOKENS) -> tuple[list[int], SpecStats]:
    stats, out = SpecStats(draft_length=settings.draft_length), []
    if isinstance(drafter, PeekingDrafter):
        drafter.emitted = out
    for token in speculative_tokens(model, drafter, PROMPT, settings, stats):
        out.append(token)
        if len(out) == n:
            break
    return out, stats


# ---------------------------------------------------------------- the drafter's math


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    d, vocab, batch, length = 6, 11, 5, 3
    params = {k: v + rng.normal(0, 0.1, v.shape)
              for k, v in init_params(d, 2, seed=3, dtype=np.float64).items()}
    head, h = rng.normal(0, 1, (vocab, d)), rng.normal(0, 1, (batch, d))
    emb = rng.normal(0, 1, (batch, length, d))
    targets = rng.integers(-1, vocab, (batch, length))
    extra = (rng.normal(0, 1, (batch, length, d)), 0.7)  # the feature-distillation term
    _, grads = loss_and_grads(params, head, h, emb, targets, *extra)
    for name, value in params.items():
        idx = tuple(rng.integers(0, s) for s in value.shape)  # one entry per tensor
        old = value[idx]
        value[idx] = old + 1e-6
        up, _ = loss_and_grads(params, head, h, emb, targets, *extra)
        value[idx] = old - 1e-6
        down, _ = loss_and_grads(params, head, h, emb, targets, *extra)
        value[idx] = old
        assert abs((up - down) / 2e-6 - grads[name][idx]) < 1e-6, name


def test_examples_count_only_where_the_text_follows_the_model():
    hidden = np.arange(2 * 6 * 1, dtype=np.float32).reshape(2, 6, 1)
    argmax = np.array([[5, 6, 7, 8, 9, 4], [1, 2, 3, 4, 5, 6]])
    text = np.array([[0, 5, 6, 0, 8, 9], [0, 1, 2, 3, 4, 5]])  # row 0 disagrees at 3
    h, read, targets, nxt = make_examples(hidden, argmax, 2, text)
    assert read[:4].tolist() == [[5, 6], [6, 7], [7, 8], [8, 9]]
    assert targets[:4].tolist() == [[6, 7], [7, -1], [-1, -1], [9, 4]]
    assert targets[4:].tolist() == [[2, 3], [3, 4], [4, 5], [5, 6]]
    assert nxt[0, :, 0].tolist() == [1, 2] and h[0, 0] == 0


def test_training_lowers_the_loss_and_reports(tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    model, _ = load_dense(flash_dir)
    # the model's own greedy text: every target counts
    tokens = np.array([[t] + [int(x) for x, _ in generate_step(mx.array([t]), model,
                                                               max_tokens=23)]
                       for t in range(10, 16)])
    cfg = DrafterConfig(length=3, steps=30, batch_size=64, lr=3e-3, vocab=128, holdout=0.2)
    drafter, report = train_drafter(model, flash_dir, tokens, cfg)
    assert np.mean(report.losses[-5:]) < np.mean(report.losses[:5])
    assert drafter.vocab.size == 128 and 0 < report.vocab_coverage <= 1
    assert len(report.holdout["top1_per_step"]) == 3
    assert drafter.meta["train_seconds"] >= 0


# ---------------------------------------------------------------- tree, mask, acceptance


def test_token_tree_merges_shared_prefixes():
    tree = token_tree(7, np.array([[1, 2, 3], [1, 2, 4], [5, 2, 3]]))
    assert tree.tokens.tolist() == [7, 1, 5, 2, 2, 3, 4, 3]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 2, 3, 3, 4]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3, 3, 3]
    anc = tree.ancestors()
    assert anc[6].nonzero()[0].tolist() == [0, 1, 3, 6]
    assert anc[7].nonzero()[0].tolist() == [0, 2, 4, 7]


def test_accept_follows_the_models_argmax():
    tree = token_tree(7, np.array([[1, 2, 3], [1, 2, 4], [5, 2, 3]]))
    argmax = np.zeros(tree.size, dtype=int)
    argmax[[0, 1, 3, 6]] = [1, 2, 4, 9]  # root->1->2->4, then the model says 9
    assert accept(tree, argmax) == ([0, 1, 3, 6], 9)
    argmax[0] = 8  # the first draft token is already wrong
    assert accept(tree, argmax) == ([0], 8)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3_text", "nemotron"])
def test_tree_logits_equal_sequential_decoding(arch, tiny_dirs):
    """Every node's logits from one tree pass = decoding its path token by token."""
    _, flash_dir = tiny_dirs(arch)
    model, _ = load_dense(flash_dir)
    tree = token_tree(11, np.array([[20, 21, 22, 23], [20, 30, 31, 32], [40, 41, 42, 43]]))
    cache = make_cache(model)
    hidden_and_logits(model, mx.array([PROMPT]), cache)
    _, logits = verify_tree(model, cache, tree)
    for leaf in range(tree.size - 3, tree.size):
        path = tree.ancestors()[leaf].nonzero()[0]
        ref_cache = make_cache(model)
        _, ref = hidden_and_logits(model, mx.array([PROMPT + tree.tokens[path].tolist()]),
                                   ref_cache)
        np.testing.assert_allclose(np.array(logits)[path], np.array(ref[0, len(PROMPT):]),
                                   atol=1e-4, rtol=1e-4)


def test_rollback_keeps_the_accepted_path_in_place(tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    model, _ = load_dense(flash_dir)
    tree = TokenTree(np.array([11, 20, 40, 21, 41]), np.array([-1, 0, 0, 1, 2]),
                     np.array([0, 1, 1, 2, 2]))
    cache = make_cache(model)
    hidden_and_logits(model, mx.array([PROMPT]), cache)
    verify_tree(model, cache, tree)
    rollback(cache, len(PROMPT), [0, 2, 4])  # 11 -> 40 -> 41: packed 0, 2, 4
    ref = make_cache(model)
    mx.eval(hidden_and_logits(model, mx.array([PROMPT + [11, 40, 41]]), ref))
    for c, r in zip(cache, ref, strict=True):
        assert isinstance(c, KVCache) and c.offset == r.offset == len(PROMPT) + 3
        for got, want in zip(c.state[:2], r.state[:2], strict=True):
            np.testing.assert_allclose(np.array(got[..., :c.offset, :]),
                                       np.array(want[..., :r.offset, :]), atol=1e-5)


# ---------------------------------------------------------------- greedy output is unchanged


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text", "starcoder2"])
def test_dense_greedy_identical_with_a_random_drafter(arch, tiny_dirs):
    _, flash_dir = tiny_dirs(arch)
    model, _ = load_dense(flash_dir)
    want = reference(model)
    for width, length in [(1, 1), (2, 4), (4, 3)]:
        out, stats = run(model, random_drafter(model, flash_dir), SpecSettings(width, length))
        assert out == want, (width, length)
        assert stats.totals()["verify_steps"] >= 1


def test_dense_greedy_identical_when_drafts_are_accepted(tiny_dirs):
    _, flash_dir = tiny_dirs("llama")
    model, _ = load_dense(flash_dir)
    want = reference(model)
    out, stats = run(model, PeekingDrafter(want, []), SpecSettings(3, 4))
    assert out == want
    totals = stats.totals()
    assert totals["tokens_per_step"] > 3 and totals["acceptance_rate"] > 0.7


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_flash_greedy_identical_and_stats_count_tokens(flash_load, policy, tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    settings = SpecSettings(3, 4, policy)

    def flash():
        return flash_load(flash_dir, window=2, oracle_rule="top", keep=0.4)[0]

    baseline = flash()
    want = reference(baseline)
    for drafter in (random_drafter(baseline, flash_dir), PeekingDrafter(want, [])):
        model = flash()
        if isinstance(drafter, Drafter):
            drafter.attach(model, flash_dir)
        out, stats = run(model, drafter, settings)
        assert out == want
        totals = model.flash.stats.totals()
        assert totals["decode_tokens"] >= N_TOKENS - 1  # verification calls count their tokens
        assert model.flash.stats.steps[-1].tokens == stats.steps[-1].candidates


def test_tree_too_big_for_the_sparse_path_is_refused(flash_load, tiny_dirs):
    _, flash_dir = tiny_dirs("qwen2")
    model, _ = flash_load(flash_dir)
    with pytest.raises(ValueError, match="lower --beam-width"):
        next(speculative_tokens(model, random_drafter(model, flash_dir), PROMPT, SpecSettings(4, 4)))


# ---------------------------------------------------------------- on disk


def test_save_load_round_trip_and_identity(tiny_dirs, tmp_path):
    _, flash_dir = tiny_dirs("qwen2")
    model, _ = load_dense(flash_dir)
    drafter = random_drafter(model, flash_dir)
    drafter.meta = {"note": "x"}
    path = save_drafter(drafter, flash_dir, tmp_path / "d.safetensors")
    back = load_drafter(path, flash_dir, half=False)
    assert back.meta == {"note": "x"} and np.array_equal(back.vocab, drafter.vocab)
    for k, v in drafter.params.items():  # matrices are stored as float16
        stored = v.astype(np.float16).astype(np.float32) if v.ndim == 2 else v
        np.testing.assert_array_equal(back.params[k], stored)
    back.attach(model, flash_dir)  # what the DRAM plan reserves is what it holds
    assert drafter_bytes(path, back.d_model, half=False) == back.nbytes
    assert drafter_bytes(tmp_path / "none.safetensors", back.d_model) == 0
    _, other_dir = tiny_dirs("llama")
    with pytest.raises(FormatError, match="trained for another model"):
        load_drafter(path, other_dir)


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_head_rows_come_in_the_dtype_asked_whatever_the_storage(storage, tiny_dirs):
    """The drafter's head rows: float32 for training and float32 drafting, float16 for a half
    drafter, from 16-bit stored weights alike (the stored values, converted)."""
    from mlx_flash.spec.drafter import head_weight_rows

    _, flash_dir = tiny_dirs("qwen2", storage)
    model, _ = load_dense(flash_dir, dtype="float32", fast_cpu=False)
    head = model["lm_head"] if "lm_head" in model else model.model.embed_tokens
    ids = np.array([3, 7, 200])
    want = np.array(head.weight[mx.array(ids)].astype(mx.float32))
    rows = head_weight_rows(flash_dir, ids)
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, want)
    half = head_weight_rows(flash_dir, ids, np.float16)
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, want.astype(np.float16))


def test_half_drafter_drafts_like_float32_in_half_the_memory(tiny_dirs, tmp_path):
    """Loaded half, the matrices and head rows stay float16 (multiplied by the CPU kernel):
    the plan's bytes are what it holds, about half, and its log-probabilities are float32's
    up to float16 rounding."""

    if accel_build.unavailable_reason():
        pytest.skip(f"CPU kernels: {accel_build.unavailable_reason()}")
    _, flash_dir = tiny_dirs("qwen2")
    model, _ = load_dense(flash_dir)
    path = save_drafter(random_drafter(model, flash_dir), flash_dir, tmp_path / "d.safetensors")
    full = load_drafter(path, flash_dir, half=False).attach(model, flash_dir)
    half = load_drafter(path, flash_dir, half=True).attach(model, flash_dir)
    assert half.half and not full.half
    assert drafter_bytes(path, half.d_model, half=True) == half.nbytes < 0.6 * full.nbytes
    rng = np.random.default_rng(0)
    s, h = (rng.standard_normal((3, half.d_model)).astype(np.float32) for _ in range(2))
    np.testing.assert_allclose(half.log_probs(s, h), full.log_probs(s, h), atol=2e-2)


def test_corrupt_or_missing_drafter_is_rejected(tiny_dirs, tmp_path):
    _, flash_dir = tiny_dirs("qwen2")
    model, _ = load_dense(flash_dir)
    path = save_drafter(random_drafter(model, flash_dir), flash_dir, tmp_path / "d.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum mismatch.*train-drafter"):
        load_drafter(path, flash_dir)
    entry = json.loads(path.with_suffix(".json").read_text())
    entry["sha256"] = __import__("hashlib").sha256(b"junk").hexdigest()
    path.write_bytes(b"junk")
    path.with_suffix(".json").write_text(json.dumps(entry))
    with pytest.raises(FormatError, match="not a readable safetensors"):
        load_drafter(path, flash_dir)
    with pytest.raises(FormatError, match="no drafter at"):
        load_drafter(tmp_path / "none.safetensors", flash_dir)


def test_cli_generate_with_drafter_matches_plain(tiny_dirs, tmp_path, capsys):
    from mlx_flash.cli.main import main

    _, flash_dir = tiny_dirs("mistral")  # its tiny tokenizer encodes "w1 w2 w3"
    model, _ = load_dense(flash_dir)
    save_drafter(random_drafter(model, flash_dir), flash_dir, tmp_path / "drafter.safetensors")
    args = ["generate", "--model", str(flash_dir), "--prompt", "w1 w2 w3", "-m", "12",
            "--ignore-chat-template"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    stats = tmp_path / "stats.json"
    assert main(args + ["--drafter", str(tmp_path), "--stats-json", str(stats)]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain and "tokens per verification step" in captured.err
    data = json.loads(stats.read_text())
    assert data["speculative"]["verify_steps"] >= 1
    assert data["memory"]["reserved"] == drafter_bytes(tmp_path, model.args.hidden_size) > 0
    assert main(args + ["--drafter", str(tmp_path), "--temp", "0.5"]) == 2
    assert "greedy only" in capsys.readouterr().err


# ---------------------------------------------------------------- the default model


@pytest.mark.real_model
def test_real_model_greedy_identical_with_the_drafter(real_dir, dense, dense_text):
    """The drafter `--drafter` finds (the dir's own, else the packaged one trained for this
    model), at the default setting: the text is the same as plain greedy."""
    from real import TOKENS, prompt_ids

    from mlx_flash.runtime.generate import generate_text
    from mlx_flash.spec.drafter import find_drafter
    from mlx_flash.spec.speculative import Speculation

    model, tokenizer = dense
    drafter = load_drafter(find_drafter(real_dir), real_dir).attach(model, real_dir)
    spec = Speculation(drafter, SpecSettings(1, 3))  # the default; a random drafter took 99 s
    result = generate_text(model, tokenizer, prompt_ids(tokenizer), TOKENS, speculative=spec)
    assert result.text == dense_text


def test_requests_take_rounds_of_the_documents():
    """Requests go round the documents, one kind of request per round (the first round as it
    always was, so cached answers stay valid); more than every round can make is refused."""
    from mlx_flash.offline.answers import REQUEST_ROUNDS, answer_prompts

    docs = ["def f():\n    return 1\n" * 40, "A paragraph about names. " * 40]
    first = answer_prompts(iter(docs), 2)
    assert first[0].startswith("Explain this Python code and give a short example:\n\ndef f")
    assert first[1].startswith("Explain this Python text")
    assert len(first[0]) == len(first[0].split("\n\n", 1)[0]) + 2 + 400
    every = answer_prompts(iter(docs), 2 * len(REQUEST_ROUNDS))
    assert every[:2] == first and len(set(every)) == len(every)
    assert answer_prompts(iter(docs), 3) == every[:3]
    with pytest.raises(ValueError, match="give more text"):
        answer_prompts(iter(docs), 2 * len(REQUEST_ROUNDS) + 1)
    with pytest.raises(ValueError, match="no calibration documents"):
        answer_prompts(iter([]), 1)


def test_self_generated_answers_agree_with_the_teacher(tiny_dirs):
    """The model's own answers: the teacher pass's argmax is the next token everywhere."""
    from mlx_flash.offline.answers import PROMPT_TAIL, answer_prompts, answer_sequences
    from mlx_flash.offline.train_drafter import teacher_outputs

    _, flash_dir = tiny_dirs("mistral")
    model, tokenizer = load_dense(flash_dir)
    prompts = answer_prompts(iter([" ".join(f"w{i}" for i in range(20)), "w4 w5 " * 10]), 2)
    tokens, contexts = answer_sequences(model, tokenizer, prompts, PROMPT_TAIL + 12)
    assert tokens.shape == (2, PROMPT_TAIL + 12)
    hidden, argmax = teacher_outputs(model, tokens, contexts=contexts)
    _, _, targets, _ = make_examples(hidden[:, PROMPT_TAIL - 1:], argmax[:, PROMPT_TAIL - 1:],
                                     3, tokens[:, PROMPT_TAIL - 1:])
    assert (targets >= 0).all()


def test_batched_answers_equal_one_at_a_time_and_are_cached(tiny_dirs, tmp_path):
    """Left-padded batches generate the same answers as one prompt at a time, with the teacher
    pass's hidden states and argmax; the cache reuses rows and generates only missing ones."""
    from mlx_flash.offline.answers import (
        PROMPT_TAIL,
        answer_prompts,
        answer_sequences,
        batched_answers,
        cached_answers,
    )
    from mlx_flash.offline.train_drafter import teacher_outputs

    _, flash_dir = tiny_dirs("mistral")
    model, tokenizer = load_dense(flash_dir)
    docs = [" ".join(f"w{i}" for i in range(20)), "w4 w5 " * 10, "w7 w8 " * 7]
    prompts = answer_prompts(iter(docs), 3)  # prompts of three lengths: padding in a batch
    seq_len = PROMPT_TAIL + 10
    tokens, contexts = answer_sequences(model, tokenizer, prompts, seq_len)
    hidden, argmax = teacher_outputs(model, tokens, contexts=contexts)
    got = batched_answers(model, tokenizer, prompts, seq_len, batch=3)
    np.testing.assert_array_equal(got[0], tokens)
    np.testing.assert_array_equal(got[2], argmax)
    np.testing.assert_allclose(got[1], hidden, rtol=1e-3, atol=1e-3)

    ticks = []

    def generated() -> tuple[int, int]:  # (tokens announced, tokens generated); then clear
        announced = sum(n for stage, n in ticks if stage == "teacher-total")
        done = sum(n for stage, n in ticks if stage == "teacher")
        ticks.clear()
        return announced, done

    cache = tmp_path / "answers.npz"
    first = cached_answers(model, tokenizer, prompts[:2], seq_len, cache, "m", 2,
                           lambda *a: ticks.append(a[:2]))
    np.testing.assert_array_equal(first[0], tokens[:2])
    assert generated() == (2 * 10, 2 * 10)
    again = cached_answers(model, tokenizer, prompts, seq_len, cache, "m", 2,
                           lambda *a: ticks.append(a[:2]))
    assert generated() == (10, 10)  # only the third answer was generated
    np.testing.assert_array_equal(again[0], tokens)
    np.testing.assert_array_equal(again[2], argmax)
    other = cached_answers(model, tokenizer, prompts[:1], seq_len, cache, "other model", 2,
                           lambda *a: ticks.append(a[:2]))
    assert generated() == (10, 10) and other[0].shape == (1, seq_len)  # another model


def test_the_teacher_cache_is_reused_only_for_the_same_tokens_of_the_same_model(tiny_dirs,
                                                                                 tmp_path,
                                                                                 monkeypatch):
    import mlx_flash.offline.train_drafter as train

    _, flash_dir = tiny_dirs("qwen2")
    model, _ = load_dense(flash_dir)
    tokens = np.arange(24, dtype=np.int64).reshape(2, 12) % 200 + 3
    cache = tmp_path / "teacher.npz"
    hidden, _ = train.cached_teacher_outputs(model, tokens, cache, "model-a")
    calls = []
    real = train.teacher_outputs
    monkeypatch.setattr(train, "teacher_outputs",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    again, _ = train.cached_teacher_outputs(model, tokens, cache, "model-a")
    assert calls == [] and np.array_equal(again, hidden)  # same model, same tokens: reused
    train.cached_teacher_outputs(model, tokens, cache, "model-b")
    assert calls == [1], "another model's teacher pass was reused"
