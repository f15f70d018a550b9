"""Tokenizers of pretrained checkpoints: HF `tokenizer.json` and SentencePiece `tokenizer.model`.

`load_tokenizer(path)` reads a checkpoint folder (or a tokenizer file) and returns one
:class:`Tokenizer` whatever the format:

* `tokenizer.json` (the HF `tokenizers` library; preferred when both files exist, as HF's fast
  tokenizers do), else `tokenizer.model` (SentencePiece);
* the BOS / EOS / PAD tokens from `tokenizer_config.json`, then `special_tokens_map.json`, then
  the ids in `config.json`, then the SentencePiece model's own ids;
* the chat template from `chat_template.jinja` or the `chat_template` entry of
  `tokenizer_config.json` (a string, or a list of named templates of which 'default' is used).

Layout the sampler expects (bond/sampling.py, bond/models/transformer.py): prompts are
LEFT-padded to a common length P and carried with a mask (1 = real token); positions come from
the mask, so the pad id itself is never read by the model. Real tokenizers have their own BOS,
EOS and PAD ids (not the built-in tasks' id 0): the EOS id passed to the sampler is
`Tokenizer.eos_id`, and padding is told apart from real tokens by the masks only, never by id.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from bond.tasks import Prompts


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be read: the message names the file and what is missing."""


class _Backend(Protocol):
    """What a tokenizer library must provide: plain ids of text (no special tokens added) and back."""

    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_to_id(self, token: str) -> Optional[int]: ...

    def id_to_token(self, index: int) -> Optional[str]: ...


class _HFBackend:
    """The HF `tokenizers` library on a tokenizer.json; its post-processor adds BOS/EOS when asked."""

    def __init__(self, path: Path):
        import tokenizers

        self._tok = tokenizers.Tokenizer.from_file(os.fspath(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, index: int) -> Optional[str]:
        return self._tok.id_to_token(index)


class _SentencePieceBackend:
    """A SentencePiece model (Gemma, Llama-2, T5); BOS is added by the Tokenizer, not here.

    `keep_whitespace` encodes text as HF's GemmaTokenizer does whatever the model file says: no
    dummy '▁' prefix and runs of spaces kept (Gemma's own tokenizer.model already says so).
    """

    def __init__(self, path: Path, keep_whitespace: bool = False):
        try:
            import sentencepiece
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise TokenizerError(f"{path} is a SentencePiece model; install it with `pip install sentencepiece`.") from e
        if keep_whitespace:
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(Path(path).read_bytes())
            proto.normalizer_spec.add_dummy_prefix = False
            proto.normalizer_spec.remove_extra_whitespaces = False
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        else:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))
        self.vocab_size = self._sp.get_piece_size()

        self.special_pieces: dict[str, int] = {}  # strings encoded as one id wherever they occur (see encode)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """SentencePiece ids of `text`, with the special tokens written in it (a chat template's
        '<bos>', '<start_of_turn>', ...) mapped to their ids, as HF's SentencePiece tokenizers do:
        the text is split on them and each piece between them is encoded on its own."""
        del add_special_tokens  # SentencePiece adds none by itself
        if not self.special_pieces:
            return list(self._sp.encode(text))
        pattern = "(" + "|".join(re.escape(s) for s in sorted(self.special_pieces, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for piece in re.split(pattern, text):
            if piece in self.special_pieces:
                ids.append(self.special_pieces[piece])
            elif piece:
                ids.extend(self._sp.encode(piece))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_to_id(self, token: str) -> Optional[int]:
        index = self._sp.piece_to_id(token)
        return None if index == self._sp.unk_id() and token != self._sp.id_to_piece(index) else int(index)

    def id_to_token(self, index: int) -> Optional[str]:
        return self._sp.id_to_piece(index)

    def special_ids(self) -> dict[str, int]:
        ids = {"bos": self._sp.bos_id(), "eos": self._sp.eos_id(), "pad": self._sp.pad_id()}
        return {k: int(v) for k, v in ids.items() if v >= 0}


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """Text ↔ ids for one checkpoint, with its special tokens and chat template.

    Attributes:
      backend: the tokenizer library object (HF `tokenizers` or SentencePiece).
      bos_id / eos_id / pad_id: special token ids (bos_id may be None: GPT-2 has none). pad_id
        fills the left padding of prompts; it is carried by masks, so any id works.
      special_tokens: the special tokens' strings by name ('bos_token', 'eos_token', ...), the
        variables a chat template sees.
      chat_template: the Jinja2 chat template, or None.
      add_bos: whether encoding plain text prepends BOS itself (SentencePiece checkpoints; HF
        tokenizer.json files add it through their post-processor).
    """

    backend: Any
    bos_id: Optional[int]
    eos_id: int
    pad_id: int
    special_tokens: dict[str, str]
    chat_template: Optional[str] = None
    add_bos: bool = False

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added tokens included)."""
        return int(self.backend.vocab_size)

    def vocabulary(self) -> list[Optional[str]]:
        """The token string of every id, in id order: two tokenizers agree on ids iff these are equal."""
        return [self.backend.id_to_token(i) for i in range(self.vocab_size)]

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; with add_special_tokens, BOS (and whatever the tokenizer's post-processor adds)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}.")
        ids = self.backend.encode(text, add_special_tokens)
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; ids outside the tokenizer's vocabulary (a model's padded embedding rows) are dropped."""
        return self.backend.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def apply_chat_template(self, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """The checkpoint's chat template rendered as HF transformers renders it.

        Jinja2 in a sandbox with trim_blocks and lstrip_blocks, the loop-control extension, the
        `tojson` filter and the `raise_exception` and `strftime_now` functions; variables
        `messages` (a list of {'role', 'content'}), `add_generation_prompt` and the special
        tokens (`bos_token`, `eos_token`, ...). The result already holds BOS when the template
        writes it, so it is encoded without adding special tokens (`encode_prompts(chat=True)`).
        """
        if self.chat_template is None:
            raise ValueError(
                "this tokenizer has no chat template (no chat_template.jinja and no 'chat_template' in "
                "tokenizer_config.json); use chat=False or give the template."
            )
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )

    def encode_prompts(
        self, texts: Sequence[str], max_length: int, *, chat: bool = False, system: Optional[str] = None
    ) -> Prompts:
        """Prompts as the sampler takes them: `tokens [B, max_length]` int32 LEFT-padded with
        pad_id and `mask [B, max_length]` int32 (1 = real token).

        chat=True wraps each text as one user message (after an optional system message) in the
        chat template with the generation prompt; else the text is encoded with BOS.
        Truncation: a prompt longer than `max_length` keeps its END (the question and, with a
        chat template, the generation prompt are at the end), and keeps its BOS in front when it
        started with one: [BOS] + the last max_length − 1 ids. A prompt that encodes to no id at
        all is an error.
        """
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of strings, not one string; wrap it in a list.")
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise ValueError(f"max_length={max_length!r} must be a positive integer.")
        tokens = np.full((len(texts), max_length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), max_length), np.int32)
        for row, text in enumerate(texts):
            ids = self._prompt_ids(text, chat, system)
            if not ids:
                raise ValueError(f"prompt {row} ({text!r}) encodes to no tokens; drop empty prompts.")
            ids = truncate_keeping_end(ids, max_length, self.bos_id)
            tokens[row, max_length - len(ids) :] = ids
            mask[row, max_length - len(ids) :] = 1
        return Prompts(tokens, mask)

    def _prompt_ids(self, text: str, chat: bool, system: Optional[str]) -> list[int]:
        if not chat:
            return self.encode(text)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    def decode_responses(self, tokens: np.ndarray, response_mask: np.ndarray) -> list[str]:
        """Texts of the responses of `tokens [B, T]` (ids where response_mask > 0), EOS dropped.

        For the sampler's [B, N, T] output pass `tokens.reshape(-1, T)` (prompt-major order).
        """
        tokens, response_mask = np.asarray(tokens), np.asarray(response_mask)
        if tokens.ndim != 2 or response_mask.shape != tokens.shape:
            raise ValueError(
                f"tokens {tokens.shape} and response_mask {response_mask.shape} must both be [B, T]; "
                "reshape the sampler's [B, N, T] output with .reshape(-1, T)."
            )
        texts = []
        for row, keep in zip(tokens, response_mask > 0):
            ids = row[keep].tolist()
            if ids and ids[-1] == self.eos_id:
                ids = ids[:-1]
            texts.append(self.decode(ids))
        return texts


def truncate_keeping_end(ids: Sequence[int], max_length: int, bos_id: Optional[int]) -> list[int]:
    """`ids` cut to at most `max_length` by dropping ids after the BOS (if it starts with one): the end is kept."""
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and ids[0] == bos_id and max_length > 1:
        return [ids[0]] + ids[len(ids) - (max_length - 1) :]
    return ids[len(ids) - max_length :]


def render_chat_template(template: str, messages: Sequence[dict[str, str]], *, add_generation_prompt: bool,
                         **variables: Any) -> str:
    """Renders a HF chat template (see `Tokenizer.apply_chat_template` for the environment)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **variables
    )


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint folder.

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
_SPECIAL_NAMES = ("bos", "eos", "pad", "unk")


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None


def _token_string(entry: Any) -> Optional[str]:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict {'content': ...}."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None


def _chat_template(folder: Path, tokenizer_config: dict) -> Optional[str]:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{'name': 'default', 'template': ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _added_tokens(tokenizer_config: dict) -> dict[str, int]:
    """The special added tokens of tokenizer_config.json's 'added_tokens_decoder' ({id: {'content', 'special'}})."""
    added = tokenizer_config.get("added_tokens_decoder") or {}
    return {
        entry["content"]: int(index) for index, entry in added.items()
        if isinstance(entry, dict) and entry.get("special", True) and entry.get("content")
    }


def find_tokenizer_file(path: str | os.PathLike) -> Path:
    """The tokenizer file of a checkpoint folder (tokenizer.json before tokenizer.model), or `path` itself."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise TokenizerError(f"no tokenizer at {os.fspath(path)!r}: no such file or folder.")
    for name in TOKENIZER_FILES:
        if (path / name).exists():
            return path / name
    raise TokenizerError(
        f"{os.fspath(path)!r} has no tokenizer: expected one of {TOKENIZER_FILES} (copy the checkpoint's tokenizer "
        "files next to config.json, or point the tokenizer path at a folder that has them)."
    )


def load_tokenizer(path: str | os.PathLike, *, eos_token: Optional[str] = None) -> Tokenizer:
    """The tokenizer of a checkpoint folder (or of a tokenizer.json / tokenizer.model file).

    `eos_token` overrides the EOS token (e.g. '<end_of_turn>' or '<|eot_id|>' for chat models
    whose turns end with a token other than the checkpoint's EOS).
    """
    file = find_tokenizer_file(path)
    folder = file.parent
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    if file.name.endswith(".json"):
        backend = _HFBackend(file)
    else:
        gemma = str(tokenizer_config.get("tokenizer_class", "")).startswith("Gemma")
        backend = _SentencePieceBackend(file, keep_whitespace=gemma)
    special_map = _read_json(folder / "special_tokens_map.json")
    model_config = _read_json(folder / "config.json")
    sp_ids = backend.special_ids() if isinstance(backend, _SentencePieceBackend) else {}

    strings: dict[str, str] = {}
    ids: dict[str, int] = {}
    for name in _SPECIAL_NAMES:
        token = _token_string(tokenizer_config.get(f"{name}_token")) or _token_string(special_map.get(f"{name}_token"))
        if name == "eos" and eos_token is not None:
            token = eos_token
        if token is not None:
            index = backend.token_to_id(token)
            if index is None:
                raise TokenizerError(f"the {name} token {token!r} of {folder} is not in the tokenizer's vocabulary.")
            strings[f"{name}_token"], ids[name] = token, int(index)
            continue
        fallback = model_config.get(f"{name}_token_id")
        if isinstance(fallback, list):  # e.g. several EOS ids in a chat model's config: the first
            fallback = fallback[0] if fallback else None
        if isinstance(fallback, int):
            ids[name] = fallback
        elif name in sp_ids:
            ids[name] = sp_ids[name]
    if "eos" not in ids:
        raise TokenizerError(
            f"no EOS token found for {folder}: set eos_token in tokenizer_config.json, eos_token_id in config.json, "
            "or pass eos_token= (config.pretrained.eos_token)."
        )
    if isinstance(backend, _SentencePieceBackend):
        backend.special_pieces = {**_added_tokens(tokenizer_config), **{strings[f"{n}_token"]: ids[n] for n in ids
                                                                        if f"{n}_token" in strings}}
    add_bos = bool(tokenizer_config.get("add_bos_token", isinstance(backend, _SentencePieceBackend)))
    return Tokenizer(
        backend=backend,
        bos_id=ids.get("bos"),
        eos_id=ids["eos"],
        pad_id=ids.get("pad", ids["eos"]),
        special_tokens=strings,
        chat_template=_chat_template(folder, tokenizer_config),
        add_bos=add_bos,
    )
