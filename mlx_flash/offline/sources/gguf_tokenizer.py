"""The GGUF's tokenizer rebuilt with `tokenizers` from its vocab and merges (no torch)."""

from __future__ import annotations

import numpy as np
from gguf import TokenType
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers.models import BPE

# Pre-tokenizer split patterns, by `tokenizer.ggml.pre` (the same as the HF tokenizer.json).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                  r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


PRE_PATTERNS = {"qwen2": QWEN2_PATTERN, "deepseek-r1-qwen": QWEN2_PATTERN,
                "llama-bpe": LLAMA3_PATTERN, "llama3": LLAMA3_PATTERN,
                "smaug-bpe": LLAMA3_PATTERN, "gpt-2": None, "default": None}


def _token_meta(meta: dict, where: str) -> tuple[list[str], np.ndarray]:
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"{where}: no tokenizer.ggml.tokens in the GGUF metadata; the file "
                         "carries no tokenizer, pass one from the HF model")
    types = meta.get("tokenizer.ggml.token_type")
    types = np.full(len(tokens), TokenType.NORMAL) if types is None else np.asarray(types)
    return tokens, types


def build_tokenizer(meta: dict, where: str = "GGUF"):
    """A `tokenizers.Tokenizer` from the GGUF vocabulary ("gpt2" BPE or "llama" SentencePiece)."""
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        tok = _byte_level_bpe(meta, where)
    elif model == "llama":
        tok = _sentencepiece_bpe(meta, where)
    else:
        raise ValueError(f"{where}: tokenizer.ggml.model {model!r} is not supported (gpt2, "
                         "llama are); copy the HF tokenizer files into the model dir instead")
    tokens, types = _token_meta(meta, where)
    tok.add_tokens(_added_tokens(tokens, types))
    tok.post_processor = _post_processor(meta, tokens, where) or tok.post_processor
    return tok


def _byte_level_bpe(meta: dict, where: str):
    """GPT-2 style byte-level BPE (qwen2, llama3): vocab + ranked merges + a split regex."""

    tokens, _ = _token_meta(meta, where)
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_PATTERNS:
        raise ValueError(f"{where}: pre-tokenizer {pre!r} is not supported (supported: "
                         f"{', '.join(sorted(PRE_PATTERNS))}); copy the HF tokenizer files "
                         "into the model dir instead")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    # llama3's tokenizer.json takes whole words found in the vocab before merging
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False,
                        ignore_merges=PRE_PATTERNS[pre] == LLAMA3_PATTERN))
    if PRE_PATTERNS[pre] is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_PATTERNS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in ("qwen2", "deepseek-r1-qwen"):
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _sentencepiece_bpe(meta: dict, where: str):
    """SentencePiece BPE (llama2, gemma) as a `tokenizers` BPE with byte fallback.

    SentencePiece merges the adjacent pair whose merged piece has the highest score; the
    equivalent ranked merge list is every split of every piece into two pieces, by that score.
    """

    tokens, types = _token_meta(meta, where)
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise ValueError(f"{where}: a llama (SentencePiece) vocabulary needs "
                         "tokenizer.ggml.scores; the GGUF has none")
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    unk = [tokens[i] for i in np.flatnonzero(types == TokenType.UNKNOWN)]
    tok = Tokenizer(BPE(vocab, spm_merges(tokens, scores, types), unk_token=unk[0] if unk else None,
                        fuse_unk=True, byte_fallback=True))
    # SentencePiece (and llama.cpp) put a space before the text and after each special token:
    # a normalizer runs on every stretch of text between added tokens, so it does the same.
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def spm_merges(tokens: list[str], scores: np.ndarray, types: np.ndarray) -> list[tuple[str, str]]:
    """Ranked BPE merges of a SentencePiece vocab: (left, right) pairs, best first."""
    normal = {}
    for i, token in enumerate(tokens):
        if types[i] == TokenType.NORMAL:
            normal.setdefault(token, i)
    found = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                found.append((-float(scores[i]), i, normal[left], normal[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _added_tokens(tokens: list[str], types: np.ndarray) -> list:
    """CONTROL/UNKNOWN tokens become special added tokens, USER_DEFINED plain added tokens.

    Both are matched whole before pre-tokenization; only special ones are dropped by
    `decode(skip_special_tokens=True)` (HF's Qwen2 marks `<tool_call>` the same way).
    """

    special = (TokenType.CONTROL, TokenType.UNKNOWN)
    wanted = np.flatnonzero(np.isin(types, (*special, TokenType.USER_DEFINED)))
    return [AddedToken(tokens[i], special=int(types[i]) in special, normalized=False)
            for i in wanted]


def _post_processor(meta: dict, tokens: list[str], where: str):
    """bos/eos around each sequence when the GGUF asks for them (llama2/3, gemma)."""

    add_bos, add_eos = _add_flags(meta)
    if not (add_bos or add_eos):
        return None
    ids = {key: meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos")}
    for key, on in (("bos", add_bos), ("eos", add_eos)):
        if on and not (ids[key] is not None and 0 <= int(ids[key]) < len(tokens)):
            raise ValueError(f"{where}: tokenizer.ggml.add_{key}_token is set but "
                             f"tokenizer.ggml.{key}_token_id is missing or out of range")
    bos = [tokens[int(ids["bos"])]] if add_bos else []
    eos = [tokens[int(ids["eos"])]] if add_eos else []
    special = {tokens[int(ids[k])]: int(ids[k]) for k, on in (("bos", add_bos), ("eos", add_eos))
               if on}
    return processors.TemplateProcessing(single=bos + ["$A"] + eos,
                                         pair=bos + ["$A"] + eos + bos + ["$B:1"] + eos,
                                         special_tokens=list(special.items()))


def _add_flags(meta: dict) -> tuple[bool, bool]:
    llama = meta.get("tokenizer.ggml.model") == "llama"  # llama.cpp's defaults per vocab kind
    return (bool(meta.get("tokenizer.ggml.add_bos_token", llama)),
            bool(meta.get("tokenizer.ggml.add_eos_token", False)))


def _token_string(meta: dict, tokens: list[str], key: str) -> str | None:
    """The text of a special token named by id in the metadata (key: "bos", "padding", ...)."""
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json for HF's PreTrainedTokenizerFast (what mlx_lm loads)."""
    tokens = meta["tokenizer.ggml.tokens"]
    add_bos, add_eos = _add_flags(meta)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
              "add_eos_token": add_eos, "clean_up_tokenization_spaces": False}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        if (text := _token_string(meta, tokens, key)) is not None:
            config[f"{name}_token"] = text
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta["tokenizer.chat_template"]
    arch = meta.get("general.architecture")
    if f"{arch}.context_length" in meta:
        config["model_max_length"] = int(meta[f"{arch}.context_length"])
    return config
