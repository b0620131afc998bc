"""GGUF sources: tiny .gguf files written here with gguf.GGUFWriter, read back as mlx_lm models.

Each tiny model starts from the HF/mlx_lm weights of an mlx_lm model class (d_model 64, 2
layers), is written the way llama.cpp's converter writes it (GGUF names, llama q/k permutation,
gemma3 norms + 1, some tensors F16/BF16/Q8_0) and must come back as the same weights: values,
names (strict `load_weights`) and logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import TokenType
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, load_tokenizer

import mlx_flash.offline.sources.gguf as gguf_source
from mlx_flash.offline.sources.gguf import (
    GGUFCheckpoint,
    llama3_factors,
    read_header,
    sliding_window_pattern,
    unpermute_rows,
)
from mlx_flash.offline.sources.gguf_tokenizer import spm_merges

D, FFN, VOCAB_EXTRA = 64, 128, 8

# GGUF metadata of each tiny model (without the "<arch>." prefix)
META = {
    "qwen2": {"block_count": 2, "context_length": 512, "embedding_length": D,
              "feed_forward_length": FFN, "attention.head_count": 4, "attention.head_count_kv": 2,
              "rope.freq_base": 1e6, "attention.layer_norm_rms_epsilon": 1e-6},
    "llama": {"block_count": 2, "context_length": 512, "embedding_length": D,
              "feed_forward_length": FFN, "attention.head_count": 4, "attention.head_count_kv": 2,
              "rope.freq_base": 5e5, "rope.dimension_count": 16,
              "attention.layer_norm_rms_epsilon": 1e-5},
    "gemma3": {"block_count": 2, "context_length": 1024, "embedding_length": D,
               "feed_forward_length": FFN, "attention.head_count": 2,
               "attention.head_count_kv": 1, "attention.key_length": 32,
               "attention.value_length": 32, "rope.freq_base": 1e6,
               "attention.sliding_window": 16, "attention.sliding_window_pattern": 2,
               "attention.layer_norm_rms_epsilon": 1e-6},
}
MODEL_TYPE = {"qwen2": "qwen2", "llama": "llama", "gemma3": "gemma3_text"}

# mlx_lm module -> llama.cpp tensor name, written out independently of
# mlx_flash.offline.sources.gguf
GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GGUF_GEMMA3 = {**GGUF_BLOCK, "post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
GGUF_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
               "lm_head": "output"}
# how some tensors are stored (everything else F32)
STORED = {"model.layers.0.mlp.up_proj.weight": Q.Q8_0,
          "model.embed_tokens.weight": Q.Q8_0,
          "model.layers.1.mlp.gate_proj.weight": Q.F16,
          "model.layers.1.self_attn.o_proj.weight": Q.BF16}


def gguf_name(name: str, arch: str) -> str:
    module, suffix = name.rsplit(".", 1)
    if module in GGUF_GLOBAL:
        return f"{GGUF_GLOBAL[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)
    table = GGUF_GEMMA3 if arch == "gemma3" else GGUF_BLOCK
    return f"blk.{layer}.{table[rest]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF rotary halves -> pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


# ---------------------------------------------------------------- tiny tokenizers


def byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode table, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    extra, chars = 0, []
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


GPT2_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "d e",
               "de f"]
GPT2_SPECIAL = [("<|endoftext|>", TokenType.CONTROL), ("<|im_start|>", TokenType.CONTROL),
                ("<|im_end|>", TokenType.CONTROL), ("<tool_call>", TokenType.USER_DEFINED)]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def gpt2_vocab() -> dict:
    tokens = byte_chars() + [m.replace(" ", "") for m in GPT2_MERGES]
    types = [TokenType.NORMAL] * len(tokens)
    for text, kind in GPT2_SPECIAL:
        tokens.append(text)
        types.append(kind)
    eos = tokens.index("<|im_end|>")
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [int(t) for t in types],
            "tokenizer.ggml.merges": GPT2_MERGES, "tokenizer.ggml.eos_token_id": eos,
            "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
            "tokenizer.ggml.padding_token_id": tokens.index("<|endoftext|>"),
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHATML}


SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "a", "b", "c", "he", "ll", "▁he", "llo",
              "▁hello", "▁w", "or", "ld", "▁wor", "▁world", "bc", "ab"]


def spm_vocab(add_space_prefix: bool = True) -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    types = ([TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256
             + [TokenType.NORMAL] * len(SPM_PIECES))
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))]
    scores[tokens.index("bc")] = -5.5  # "bc" outranks "ab": "abc" must become a + bc
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [int(t) for t in types],
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_space_prefix": add_space_prefix}


# ---------------------------------------------------------------- writing tiny GGUFs


def hf_weights(arch: str, vocab: int, tie: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random f32 weights with the names and shapes of the mlx_lm model."""
    m = META[arch]
    config = {"model_type": MODEL_TYPE[arch], "hidden_size": D, "num_hidden_layers": 2,
              "intermediate_size": FFN, "num_attention_heads": m["attention.head_count"],
              "num_key_value_heads": m["attention.head_count_kv"], "rms_norm_eps": 1e-6,
              "vocab_size": vocab, "tie_word_embeddings": tie, "head_dim": 32 if arch ==
              "gemma3" else 16}
    model_class, args_class = _get_classes(config)
    params = tree_flatten(model_class(args_class.from_dict(config)).parameters())
    rng = np.random.default_rng(seed)
    out = {n: rng.normal(0, 0.2, v.shape).astype(np.float32) for n, v in params}
    if tie:
        out.pop("lm_head.weight", None)
    return out


def add_meta(w: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


def stored(name: str, arr: np.ndarray, arch: str, heads: tuple[int, int]) -> tuple:
    """(raw array, raw dtype) as llama.cpp's converter writes the HF tensor `name`."""
    if arch == "llama" and ".q_proj." in name:
        arr = llama_cpp_permute(arr, heads[0])
    if arch == "llama" and ".k_proj." in name:
        arr = llama_cpp_permute(arr, heads[1])
    if arch == "gemma3" and name.endswith("norm.weight"):
        arr = arr + np.float32(1)
    qtype = STORED.get(name, Q.F32)
    if qtype == Q.F32:
        return arr, None
    if qtype == Q.F16:
        return arr.astype(np.float16), None
    return gguf.quants.quantize(arr, qtype), qtype


def expected(name: str, arr: np.ndarray, arch: str) -> np.ndarray:
    """What reading `name` back must give: the HF tensor up to the storage rounding."""
    if arch == "gemma3" and name.endswith("norm.weight"):
        return (arr + np.float32(1)) - np.float32(1)  # stored + 1, read - 1, in f32
    qtype = STORED.get(name, Q.F32)
    if qtype == Q.F16:
        return arr.astype(np.float16)
    if qtype == Q.BF16:
        return gguf.quants.quantize(arr, Q.BF16).view(np.uint16).reshape(arr.shape)
    if qtype != Q.F32:
        return gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype).astype(np.float16)
    return arr


def write_gguf(path: Path, arch: str, weights: dict, tokenizer: dict, extra: dict | None = None,
               raw: dict | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in META.get(arch, META["qwen2"]).items():
        add_meta(w, f"{arch}.{key}", value)
    for key, value in {**tokenizer, **(extra or {})}.items():
        add_meta(w, key, value)
    meta = META.get(arch, META["qwen2"])
    heads = (meta["attention.head_count"], meta["attention.head_count_kv"])
    for name, arr in weights.items():
        data, qtype = stored(name, arr, arch, heads)
        w.add_tensor(gguf_name(name, arch), data, raw_dtype=qtype)
    for name, (data, qtype) in (raw or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """arch -> (gguf path, HF weights): qwen2 untied + gpt2 vocab, llama and gemma3 tied + spm."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch, tok in (("qwen2", gpt2_vocab()), ("llama", spm_vocab()),
                      ("gemma3", spm_vocab(add_space_prefix=False))):
        weights = hf_weights(arch, len(tok["tokenizer.ggml.tokens"]), tie=arch != "qwen2")
        out[arch] = (write_gguf(root / f"{arch}.gguf", arch, weights, tok), weights)
    return out


def load_model(config: dict, weights: dict):
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    arrays = {n: mx.array(a) for n, a in weights.items()}
    model.load_weights(list(model.sanitize(arrays).items()), strict=True)
    return model


def as_f32(arr: np.ndarray, dtype: str) -> np.ndarray:
    return (arr.astype(np.uint32) << 16).view(np.float32) if dtype == "bfloat16" else arr.astype(
        np.float32)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_tensors_and_values(models, arch):
    path, weights = models[arch]
    ckpt = GGUFCheckpoint(path)
    infos = ckpt.tensors()
    assert set(infos) == set(weights)
    for name, arr in weights.items():
        info = infos[name]
        assert info.shape == arr.shape, name
        got = ckpt.read(name)
        assert got.shape == arr.shape and got.dtype == np.dtype(
            np.uint16 if info.dtype == "bfloat16" else info.dtype), name
        want = expected(name, arr, arch)
        np.testing.assert_array_equal(got, want, err_msg=name)
    # quantization error of the Q8_0 tensor is small against the original
    up = "model.layers.0.mlp.up_proj.weight"
    assert infos[up].dtype == "float16"
    np.testing.assert_allclose(ckpt.read(up), weights[up], atol=np.abs(weights[up]).max() / 100)
    assert infos["model.layers.1.self_attn.o_proj.weight"].dtype == "bfloat16"
    assert infos["model.norm.weight"].dtype == "float32"
    assert ckpt.files() == [path] and ckpt.kind == "gguf"


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_config_loads_and_logits_match(models, arch):
    path, weights = models[arch]
    ckpt = GGUFCheckpoint(path)
    cfg = ckpt.config
    assert cfg["model_type"] == MODEL_TYPE[arch]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]) == (D, 2, FFN)
    assert cfg["vocab_size"] == weights["model.embed_tokens.weight"].shape[0]
    assert cfg["tie_word_embeddings"] == (arch != "qwen2")
    for key in ("num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
                "max_position_embeddings", "eos_token_id"):
        assert key in cfg, key
    infos = ckpt.tensors()
    reference = {n: as_f32(expected(n, a, arch), infos[n].dtype) for n, a in weights.items()}
    ours = {n: as_f32(ckpt.read(n), infos[n].dtype) for n in infos}
    tokens = mx.array([[3, 5, 7, 11, 2]])
    want = load_model(cfg, reference)(tokens)
    got = load_model(cfg, ours)(tokens)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    assert ckpt.spec().kind == "gated"


def test_gemma3_config_and_norms(models):
    path, weights = models["gemma3"]
    ckpt = GGUFCheckpoint(path)
    cfg = ckpt.config
    assert cfg["head_dim"] == 32 and cfg["query_pre_attn_scalar"] == 32
    assert cfg["sliding_window"] == 16 and cfg["rope_local_base_freq"] == 10000.0
    assert cfg["sliding_window_pattern"] == 2
    assert sliding_window_pattern(np.array([True] * 5 + [False] + [True] * 3), "x") == 6
    with pytest.raises(ValueError, match="fixed period"):
        sliding_window_pattern(np.array([True, False, False, True]), "x")
    raw = read_header(path)[1]
    for name in ("model.norm.weight", "model.layers.0.self_attn.q_norm.weight",
                 "model.layers.1.pre_feedforward_layernorm.weight"):
        stored_plus_one = np.fromfile(path, np.float32, raw[gguf_name(name, "gemma3")].shape[0],
                                      offset=raw[gguf_name(name, "gemma3")].offset)
        np.testing.assert_allclose(stored_plus_one - 1, ckpt.read(name), atol=1e-6)
        np.testing.assert_allclose(ckpt.read(name), weights[name], atol=1e-6)


def test_llama_unpermute_inverts_llama_cpp_permute(models):
    rng = np.random.default_rng(1)
    for n_head, shape in ((4, (64, 64)), (2, (32, 64)), (8, (128,))):
        w = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(w, n_head), n_head), w)
    path, weights = models["llama"]
    ckpt = GGUFCheckpoint(path)
    q = "model.layers.0.self_attn.q_proj.weight"
    raw = read_header(path)[1]["blk.0.attn_q.weight"]
    on_disk = np.fromfile(path, np.float32, int(np.prod(raw.shape)), offset=raw.offset)
    assert not np.array_equal(on_disk.reshape(raw.shape), weights[q])  # it was permuted
    np.testing.assert_array_equal(ckpt.read(q), weights[q])
    np.testing.assert_array_equal(ckpt.read(q.replace("q_proj", "k_proj")),
                                  weights[q.replace("q_proj", "k_proj")])
    assert ckpt.config["head_dim"] == 16 and ckpt.config["attention_bias"] is False


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    scaling = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    factors = llama3_factors(scaling, 16, 5e5).astype(np.float32)
    weights = hf_weights("llama", len(spm_vocab()["tokenizer.ggml.tokens"]), tie=True)
    path = write_gguf(tmp_path / "l3.gguf", "llama", weights, spm_vocab(),
                      raw={"rope_freqs.weight": (factors, None)})
    ckpt = GGUFCheckpoint(path)
    assert "rope_freqs.weight" not in ckpt.tensors()
    assert ckpt.config["rope_scaling"]["type"] == "llama3"
    assert ckpt.config["rope_scaling"]["factor"] == 32.0
    load_model(ckpt.config, {n: as_f32(ckpt.read(n), i.dtype) for n, i in ckpt.tensors().items()})


def test_qwen3_names_and_config(tmp_path):
    weights = hf_weights("qwen2", len(gpt2_vocab()["tokenizer.ggml.tokens"]), tie=True)
    weights = {n: a for n, a in weights.items() if not n.endswith("bias")}
    q3 = {f"model.layers.{i}.self_attn.{k}_norm.weight": np.ones(16, np.float32)
          for i in range(2) for k in "qk"}
    raw = {f"blk.{i}.attn_{k}_norm.weight": (a, None) for i in range(2) for k, a in
           (("q", np.ones(16, np.float32)), ("k", np.ones(16, np.float32)))}
    path = write_gguf(tmp_path / "q3.gguf", "qwen3", weights, gpt2_vocab(), raw=raw,
                      extra={"qwen3.attention.key_length": 16})
    ckpt = GGUFCheckpoint(path)
    assert ckpt.config["model_type"] == "qwen3" and ckpt.config["head_dim"] == 16
    assert set(ckpt.tensors()) == set(weights) | set(q3)
    load_model(ckpt.config, {n: as_f32(ckpt.read(n), i.dtype) for n, i in ckpt.tensors().items()})


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "phi.gguf", "phi3", {}, gpt2_vocab(),
                      raw={"token_embd.weight": (np.zeros((4, 64), np.float32), None)})
    with pytest.raises(ValueError, match="phi3") as err:
        GGUFCheckpoint(path)
    assert "qwen2" in str(err.value) and str(path) in str(err.value)


def test_unknown_quant_type_and_truncation(tmp_path, models):
    weights = hf_weights("qwen2", len(gpt2_vocab()["tokenizer.ggml.tokens"]), tie=False)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    path = write_gguf(tmp_path / "q81.gguf", "qwen2", weights, gpt2_vocab(),
                      raw={"blk.0.ffn_extra.weight": (np.zeros((2, size * 2), np.uint8), Q.Q8_1)})
    with pytest.raises(ValueError, match="Q8_1"):
        GGUFCheckpoint(path)
    good = models["qwen2"][0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good[: len(good) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        GGUFCheckpoint(cut)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + good[4:100])
    with pytest.raises(ValueError, match="not a GGUF"):
        GGUFCheckpoint(bad)


def test_header_matches_gguf_reader(models):
    path = models["llama"][0]
    meta, tensors = read_header(path)
    reader = gguf.GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        got = meta[key]
        if isinstance(got, np.ndarray):
            np.testing.assert_allclose(got, value, err_msg=key)
        else:
            assert got == pytest.approx(value) if isinstance(got, float) else got == value, key
    for t in reader.tensors:
        ours = tensors[t.name]
        assert ours.offset == t.data_offset
        assert ours.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert ours.nbytes == t.n_bytes and ours.qtype == t.tensor_type


def check_tokenizer(out: Path, texts: list[str]):
    tok = load_tokenizer(out)
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text, (text, ids)
    return tok


def test_gpt2_tokenizer_round_trip(models, tmp_path):
    ckpt = GGUFCheckpoint(models["qwen2"][0])
    ckpt.write_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(ckpt.config))
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>" and cfg["add_bos_token"] is False
    assert cfg["chat_template"] == CHATML and cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = check_tokenizer(tmp_path, ["the world", "def f(x):\n\treturn x**2  # ok",
                                     "héllo wörld 你好 🙂", "a<|im_start|>b<tool_call>c"])
    tokens = gpt2_vocab()["tokenizer.ggml.tokens"]
    assert tok.encode(" the world", add_special_tokens=False) == [tokens.index("Ġthe"),
                                                                  tokens.index("Ġworld")]
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    start, end = tokens.index("<|im_start|>"), tokens.index("<|im_end|>")
    assert ids[0] == start and ids.count(start) == 2 and ids.count(end) == 1
    assert tok.decode([tokens.index("<tool_call>"), end], skip_special_tokens=True) == "<tool_call>"
    assert tok.eos_token_id == end


@pytest.mark.parametrize("prefix", [True, False])
def test_sentencepiece_tokenizer_round_trip(tmp_path, prefix):
    from mlx_flash.offline.sources.gguf_tokenizer import build_tokenizer, tokenizer_config

    meta = spm_vocab(add_space_prefix=prefix)
    build_tokenizer(meta).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta)))
    tok = check_tokenizer(tmp_path, ["hello world", "Hello, wörld! 你好\n  x", "abc"])
    tokens = meta["tokenizer.ggml.tokens"]
    ids = tok.encode("hello world")
    pieces = ["▁hello", "▁world"] if prefix else ["he", "llo", "▁world"]
    assert ids == [1] + [tokens.index(p) for p in pieces]  # bos first, then the pieces
    assert tok.decode(ids, skip_special_tokens=True) == "hello world"
    abc = tok.encode("abc", add_special_tokens=False)
    assert [tokens[i] for i in abc] == (["▁", "a", "bc"] if prefix else ["a", "bc"])


def test_spm_merges_rank_by_score():
    tokens, scores = ["a", "b", "c", "ab", "bc", "abc"], np.array([0, 0, 0, -2.0, -1.0, -3.0])
    types = np.full(6, TokenType.NORMAL)
    assert spm_merges(tokens, scores, types) == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


# ---------------------------------------------------------------- the real default model


def real_gguf() -> Path | None:
    """/tmp/qwen.gguf or the pulled default model; pulled when MLX_FLASH_REQUIRE_REAL_MODEL is
    set (CI: a missing model is an error there, not a skip)."""
    from mlx_flash.format.home import default_models_dir
    from mlx_flash.offline.pull import DEFAULT_MODEL, pull

    for path in (Path("/tmp/qwen.gguf"), default_models_dir() / DEFAULT_MODEL / "model.gguf"):
        if path.is_file() and path.stat().st_size == 491400064:
            return path
    if os.environ.get("MLX_FLASH_REQUIRE_REAL_MODEL"):
        return pull(progress=False)
    return None


@pytest.mark.real_model
def test_real_model_config_and_tokenizer(tmp_path):
    path = real_gguf()
    if path is None:
        pytest.skip("the default model is not here: neither /tmp/qwen.gguf nor the pulled "
                    "model.gguf exists (run `mlx-flash pull` to fetch it, ~0.5 GB)")
    ckpt = GGUFCheckpoint(path)
    cfg = ckpt.config
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"]) == ("qwen2", 24, 896)
    assert (cfg["intermediate_size"], cfg["num_attention_heads"]) == (4864, 14)
    assert (cfg["num_key_value_heads"], cfg["vocab_size"]) == (2, 151936)
    assert cfg["tie_word_embeddings"] is False and cfg["rope_theta"] == 1e6
    infos = ckpt.tensors()
    assert len(infos) == 291 and infos["lm_head.weight"].shape == (151936, 896)
    down = ckpt.read("model.layers.0.mlp.down_proj.weight")  # Q6_K
    assert down.shape == (896, 4864) and down.dtype == np.float16 and 0 < np.abs(down).max() < 10
    ckpt.write_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tok = check_tokenizer(tmp_path, ["def fib(n):\n    return n if n < 2 else fib(n - 1)\n",
                                     "héllo wörld 你好 🙂\t tabs", "<|im_start|>user\nhi"])
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert ids[-3:] == [151644, 77091, 198]  # <|im_start|> assistant \n
    assert tok.eos_token_id == 151645
    assert os.path.getsize(tmp_path / "tokenizer.json") > 1_000_000


# llama.cpp's own tokenizer fixtures: vocab-only GGUFs with test strings (.inp) and the HF
# tokenizer's ids for them (.out), e.g. from the llama-cpp-python sdist's vendor/llama.cpp/models.
VOCAB_DIR = os.environ.get("LLAMA_CPP_VOCAB_DIR")


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["qwen2", "llama-bpe", "gpt-2", "llama-spm", "phi-3"])
def test_llama_cpp_vocab_fixtures(name):
    from mlx_flash.offline.sources.gguf_tokenizer import build_tokenizer

    path = Path(VOCAB_DIR or "/nonexistent") / f"ggml-vocab-{name}.gguf"
    if not (path.exists() and path.with_suffix(".gguf.out").exists()):
        pytest.skip(f"set LLAMA_CPP_VOCAB_DIR to llama.cpp's models/ dir (it has {path.name} "
                    "and its .inp/.out fixtures) to run this check")
    tok = build_tokenizer(read_header(path)[0], str(path))
    texts = path.with_suffix(".gguf.inp").read_text("utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    outs = path.with_suffix(".gguf.out").read_text().split("\n")[: len(texts)]
    for text, out in zip(texts, outs, strict=True):
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == [int(i) for i in out.split()], text
        assert tok.decode(ids) == text


# -- hostile headers, written byte by byte --------------------------------------------------------

def gguf_bytes(kvs: list[bytes], tensors: list[bytes] = (), data: bytes = b"") -> bytes:
    """A GGUF v3 file from raw key/value and tensor-table records."""
    head = b"GGUF" + (3).to_bytes(4, "little") + len(tensors).to_bytes(8, "little")
    body = head + len(kvs).to_bytes(8, "little") + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + data + b"\0" * 64


def gstr(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(8, "little") + raw


def kv(key: str, vtype: int, value: bytes) -> bytes:
    return gstr(key) + vtype.to_bytes(4, "little") + value


def nested_array(depth: int) -> bytes:
    """An ARRAY of one ARRAY of ... (depth levels) of an empty UINT8 array."""
    array = int(gguf.GGUFValueType.ARRAY)
    inner = int(gguf.GGUFValueType.UINT8).to_bytes(4, "little") + (0).to_bytes(8, "little")
    for _ in range(depth - 1):
        inner = array.to_bytes(4, "little") + (1).to_bytes(8, "little") + inner
    return inner


def tensor_record(name: str, dims: list[int], offset: int = 0) -> bytes:
    return (gstr(name) + len(dims).to_bytes(4, "little")
            + b"".join(d.to_bytes(8, "little") for d in dims)
            + int(Q.F32).to_bytes(4, "little") + offset.to_bytes(8, "little"))


ARRAY, UINT32, STRING = (int(gguf.GGUFValueType.ARRAY), int(gguf.GGUFValueType.UINT32),
                         int(gguf.GGUFValueType.STRING))


def test_deeply_nested_arrays_are_refused_by_name(tmp_path):
    path = tmp_path / "deep.gguf"
    path.write_bytes(gguf_bytes([kv("x.deep", ARRAY, nested_array(5000))]))
    with pytest.raises(ValueError, match="deep.gguf.*nested"):
        read_header(path)
    ok = tmp_path / "ok.gguf"
    ok.write_bytes(gguf_bytes([kv("x.shallow", ARRAY, nested_array(3))]))
    assert read_header(ok)[0]["x.shallow"][0][0].size == 0


@pytest.mark.parametrize("align", [0, 3, 1 << 40])
def test_bad_alignment_is_refused_by_name(tmp_path, align):
    path = tmp_path / "align.gguf"
    value = align.to_bytes(8, "little")[:4] if align < 1 << 32 else None
    record = (kv("general.alignment", UINT32, value) if value is not None
              else kv("general.alignment", int(gguf.GGUFValueType.UINT64),
                      align.to_bytes(8, "little")))
    path.write_bytes(gguf_bytes([record], [tensor_record("w", [4])], b"\0" * 16))
    with pytest.raises(ValueError, match="align.gguf.*alignment"):
        read_header(path)


def test_alignment_of_the_wrong_type_is_refused_by_name(tmp_path):
    path = tmp_path / "align.gguf"
    path.write_bytes(gguf_bytes([kv("general.alignment", STRING, gstr("32"))]))
    with pytest.raises(ValueError, match="align.gguf.*alignment"):
        read_header(path)


@pytest.mark.parametrize("dims", [[], [4, 1, 1, 1, 1]])
def test_tensor_with_bad_dims_is_refused_by_name(tmp_path, dims):
    path = tmp_path / "dims.gguf"
    path.write_bytes(gguf_bytes([], [tensor_record("w", dims)], b"\0" * 16))
    with pytest.raises(ValueError, match="dims.gguf.*tensor w"):
        read_header(path)


def test_repeated_tensor_name_is_refused_by_name(tmp_path):
    path = tmp_path / "twice.gguf"
    records = [tensor_record("w", [4]), tensor_record("w", [4], offset=32)]
    path.write_bytes(gguf_bytes([], records, b"\0" * 64))
    with pytest.raises(ValueError, match="twice.gguf.*w.*twice"):
        read_header(path)


@pytest.mark.parametrize("key, value", [
    ("qwen2.attention.head_count", "four"),
    ("qwen2.attention.head_count", 0),
    ("qwen2.block_count", -1),
    ("qwen2.embedding_length", 2.5),
    ("qwen2.context_length", [1, 2]),
    ("qwen2.feed_forward_length", "wide"),
])
def test_metadata_of_the_wrong_type_is_refused_by_name(models, monkeypatch, key, value):
    path = models["qwen2"][0]
    meta, tensors = read_header(path)
    monkeypatch.setattr(gguf_source, "read_header", lambda p: ({**meta, key: value}, tensors))
    with pytest.raises(ValueError, match=f"qwen2.gguf.*{key}") as info:
        GGUFCheckpoint(path)
    assert repr(value) in str(info.value) or str(value) in str(info.value)
