"""The tokenizer of a flash dir, without transformers: `tokenizers` for tokenizer.json and
jinja2 for the chat template of tokenizer_config.json.

transformers' AutoTokenizer (what mlx_lm's load_tokenizer builds) took ~160 MiB of RSS for the
default model's tokenizer and 2-3 s to import; this one ~45 MiB (its Rust tables, once glibc
has its parse buffers back). `FlashTokenizer` offers what mlx_lm's `generate` /
`stream_generate` (which wrap it in their TokenizerWrapper) and runtime/generate.py use:
encode, decode, the special tokens, get_vocab, apply_chat_template and a `detokenizer`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..process import trim_heap

TOKENIZER, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
DECODE_TABLE_RSS = 3 << 20  # a ByteTable's RSS (Qwen2.5's 152k tokens: ~3 MiB)


class Vocab(Mapping):
    """A tokenizer's vocabulary as a read-only mapping that asks the tokenizer per token.
    mlx_lm's TokenizerWrapper, built by every `generate` / `stream_generate` call given a bare
    tokenizer, asks get_vocab twice for a few special tokens: building the 152k-entry dict
    each time took ~0.2 s (0.4 s before the first token of every call). Iterating still
    builds it, once per iteration."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer

    def __getitem__(self, token: str) -> int:
        i = self._tok.token_to_id(token) if isinstance(token, str) else None
        if i is None:
            raise KeyError(token)
        return i

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and self._tok.token_to_id(token) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tok.get_vocab(with_added_tokens=True))

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def _content(token) -> str | None:
    """A special token of tokenizer_config.json: a string or {"content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def _template(config: dict, root: Path) -> str | None:
    """The chat template: tokenizer_config.json's (a string, or named templates: "default"),
    else a chat_template.jinja beside it."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    if template is None and (root / "chat_template.jinja").exists():
        template = (root / "chat_template.jinja").read_text()
    return template


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = dict.fromkeys(printable), 0
    out = {chr(b): b for b in printable}
    for b in range(256):
        if b not in chars:
            out[chr(256 + extra)], extra = b, extra + 1
    return out


class ByteTable:
    """Decoding of a byte-level BPE vocabulary without the tokenizer: each id's bytes in one
    blob (~2 MiB for 152k tokens, the tokenizer ~44 MiB). ids (n,) -> the same text as
    `Tokenizer.decode` (invalid UTF-8 replaced)."""

    def __init__(self, tok: Tokenizer):
        byte_of = byte_decoder()
        special = [i for i, t in tok.get_added_tokens_decoder().items() if t.special]
        pieces = []
        for i in range(tok.get_vocab_size(with_added_tokens=True)):
            token = tok.id_to_token(i) or ""
            pieces.append(b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode()
                                   for c in token))
        self.blob = b"".join(pieces)
        self.ends = np.cumsum([len(p) for p in pieces], dtype=np.int64)
        self.special = frozenset(special)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        out = bytearray()
        for i in ids:
            if 0 <= i < len(self.ends) and not (skip_special_tokens and i in self.special):
                out += self.blob[(self.ends[i - 1] if i else 0):self.ends[i]]
        return out.decode("utf-8", "replace")


class StreamingDetokenizer:
    """Text of the tokens added so far, one token at a time (mlx_lm's detokenizer interface:
    reset, add_token, finalize, text, tokens, last_segment). Tokens since the last newline are
    decoded again per step; an incomplete UTF-8 character waits for the next token."""

    def __init__(self, tokenizer: FlashTokenizer):
        self._tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.offset, self.tokens = 0, []
        self._text, self._pending = "", []

    def add_token(self, token: int) -> None:
        self.tokens.append(token)
        self._pending.append(token)

    def finalize(self) -> None:
        self._text += self._tokenizer.decode(self._pending)
        self._pending = []

    @property
    def text(self) -> str:
        pending = self._tokenizer.decode(self._pending) if self._pending else ""
        if pending.endswith("\n"):
            self._text, self._pending, pending = self._text + pending, [], ""
        return self._text + pending.rstrip("\ufffd")

    @property
    def last_segment(self) -> str:
        """The text added since the last call."""
        text = self.text
        segment, self.offset = text[self.offset:], len(text)
        return segment


class FlashTokenizer:
    """tokenizer.json through `tokenizers`, with tokenizer_config.json's special tokens and
    chat template. eos_token_ids: the ids that end a generation (the config's eos_token and
    `extra_eos`, e.g. the model config's eos_token_id list)."""

    def __init__(self, root: Path, extra_eos: list[int] | None = None):
        path = root / TOKENIZER
        if not path.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.json; re-convert the model "
                                    "(mlx-flash convert copies it into the flash dir)")
        self._tok = Tokenizer.from_file(str(path))
        trim_heap()  # the JSON parse's buffers (~40 MiB for a 150k vocabulary) go back
        config_path = root / TOKENIZER_CONFIG
        self.config = json.loads(config_path.read_text()) if config_path.exists() else {}
        for name in SPECIAL:
            token = _content(self.config.get(name))
            setattr(self, name, token)
            setattr(self, f"{name}_id", None if token is None else self._tok.token_to_id(token))
        self.chat_template = _template(self.config, root)
        self.eos_token_ids = {i for i in [self.eos_token_id, *(extra_eos or [])] if i is not None}
        self._renderer, self._table = None, None
        self._sizes = self._tok.get_vocab_size(), self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._sizes[0]

    def __len__(self) -> int:
        return self._sizes[1]

    def drop_encoder(self) -> bool:
        """Free the tokenizer (~44 MiB for a 152k vocabulary) and decode from a `ByteTable`
        (~2 MiB), for a run that encodes once (`mlx-flash generate`). Byte-level BPE only
        (Qwen, Llama 3, GPT-2: a ByteLevel decoder); returns whether it did. encode (and a
        tokenized chat template) raises afterwards."""
        if self._table is None and type(self._tok.decoder).__name__ == "ByteLevel":
            self._table, self._tok = ByteTable(self._tok), None
            trim_heap()
        return self._table is not None

    def _encoder(self) -> Tokenizer:
        if self._tok is None:
            raise RuntimeError("this tokenizer's encoder was dropped (drop_encoder): it only "
                               "decodes now")
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._encoder().encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.config.get("add_bos_token") and \
                self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        if add_special_tokens and self.config.get("add_eos_token") and \
                self.eos_token_id is not None and ids[-1:] != [self.eos_token_id]:
            ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = (self._table or self._encoder()).decode(list(ids),
                                                       skip_special_tokens=skip_special_tokens)
        if self.config.get("clean_up_tokenization_spaces"):
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","),
                                  (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"),
                                  (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def get_vocab(self) -> Mapping[str, int]:
        """token -> id, looked up per token (see `Vocab`)."""
        return Vocab(self._encoder())

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._encoder().token_to_id(tokens)
        return [self._encoder().token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self._encoder().id_to_token(ids)
        return [self._encoder().id_to_token(i) for i in ids]

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        """A new streaming detokenizer (one per generation)."""
        return StreamingDetokenizer(self)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = True, tools=None, documents=None,
                            return_dict: bool = False, **kwargs):
        """The conversation through the chat template (as transformers renders it: jinja2,
        sandboxed, trim_blocks and lstrip_blocks); token ids when `tokenize`, else the text.
        messages: [{"role": ..., "content": ...}, ...]."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json has "
                             "no chat_template): pass the prompt as plain text")
        specials = {name: getattr(self, name) for name in SPECIAL}
        text = self._render(messages=messages, add_generation_prompt=add_generation_prompt,
                            tools=tools, documents=documents, **{**specials, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _render(self, **variables) -> str:
        if self._renderer is None:
            self._renderer = compile_template(self.chat_template)
        return self._renderer.render(**variables)


def compile_template(source: str):
    """A jinja2 template with the environment transformers gives chat templates."""
    from jinja2.exceptions import TemplateError  # jinja2 is needed only for chat templates
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def load_tokenizer(root: Path, eos_token_ids: list[int] | None = None) -> FlashTokenizer:
    """The flash dir's tokenizer; eos_token_ids: more ids that end a generation."""
    return FlashTokenizer(root, eos_token_ids)
