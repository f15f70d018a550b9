"""Text prompt sets: TFDS datasets by name, local JSONL and parquet files, tokenized once.

A prompt source is a string `kind:location`:

    tfds:xsum                   a TFDS catalog dataset, read through `tfds.data_source` (random
                                access to array_record files, no TensorFlow). Prepare it once with
                                `tfds build xsum --file_format=array_record` (or any builder's
                                `download_and_prepare(file_format='array_record')`).
    jsonl:/data/prompts.jsonl   one JSON object per line
    parquet:/data/prompts.parquet   a parquet file (pyarrow)
    inline:["first prompt", "second prompt"]   a JSON list of texts written into the config
                                (smoke tests; the field is not read and every split is the list)

The text of a prompt is the `field` of each record (e.g. 'document' for xsum). A location may
contain `{split}`, replaced by the split name (e.g. `jsonl:/data/{split}.jsonl`); a file without
it serves every split.

`load_text_prompts` reads the texts of one split, wraps each in `template` (a format string with
`{text}`, e.g. 'Summarize: {text}') and tokenizes them all once into :class:`TokenizedPrompts`,
a random-access source with the same rows `read_prompt_rows` (bond/tasks/prompts.py) reads from
the built-in tasks' TFDS sources: {'prompt': int32 [P] left-padded, 'prompt_mask': int32 [P]}.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from bond.tasks import Prompts
from bond.tokenizer import Tokenizer

SOURCE_KINDS = ("tfds", "jsonl", "parquet", "inline")
FILE_KINDS = ("jsonl", "parquet")

# TFDS registers its catalog lazily; without TensorFlow a dataset's module must be imported
# before `tfds.data_source` finds it by name. These are the catalog's text packages.
_TFDS_TEXT_PACKAGES = ("summarization", "text", "question_answering", "translate", "text_simplification")


def parse_source(source: str) -> tuple[str, str]:
    """`'kind:location'` → (kind, location); kind is one of SOURCE_KINDS."""
    kind, sep, location = str(source).partition(":")
    if not sep or kind not in SOURCE_KINDS or not location:
        raise ValueError(
            f"prompt source {source!r} must be 'kind:location' with kind one of {SOURCE_KINDS}, "
            "e.g. 'tfds:xsum', 'jsonl:/data/prompts.jsonl' or 'parquet:/data/prompts.parquet'."
        )
    return kind, location


def _for_split(location: str, split: str) -> str:
    return location.replace("{split}", split)


def _text(value, field: str, where: str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise ValueError(f"field {field!r} of {where} holds {type(value).__name__}, not text; choose a text field.")


def read_jsonl(path: str | os.PathLike, field: str, limit: Optional[int] = None) -> list[str]:
    """The `field` of the first `limit` (all when None) records of a JSONL file; blank lines are skipped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no prompt file at {os.fspath(path)!r}.")
    texts = []
    with path.open() as f:
        for number, line in enumerate(f, 1):
            if limit is not None and len(texts) >= limit:
                break
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"line {number} of {path} has no field {field!r} (it has {keys}); set the prompt field.")
            texts.append(_text(record[field], field, f"line {number} of {path}"))
    return texts


def read_parquet(path: str | os.PathLike, field: str, limit: Optional[int] = None) -> list[str]:
    """The `field` column of a parquet file (its first `limit` rows when given)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no prompt file at {os.fspath(path)!r}.")
    schema = pq.read_schema(path)
    if field not in schema.names:
        raise ValueError(f"{path} has no column {field!r} (it has {schema.names}); set the prompt field.")
    column = pq.read_table(path, columns=[field]).column(field)
    values = column.slice(0, limit).to_pylist() if limit is not None else column.to_pylist()
    return [_text(v, field, os.fspath(path)) for v in values]


def read_inline(location: str) -> list[str]:
    """The texts of an `inline:` source: a JSON list of strings."""
    try:
        texts = json.loads(location)
    except json.JSONDecodeError as e:
        raise ValueError(f"an inline prompt source must be a JSON list of strings, e.g. inline:[\"a\", \"b\"] ({e}).") from None
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError("an inline prompt source must be a JSON list of strings, e.g. inline:[\"a\", \"b\"].")
    return texts


def tfds_source(name: str, split: str, data_dir: Optional[str] = None):
    """`tfds.data_source(name, split)`, importing TFDS's text catalog packages if the name is not registered yet."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        for package in _TFDS_TEXT_PACKAGES:
            try:
                importlib.import_module(f"tensorflow_datasets.{package}")
            except ImportError:  # a package whose builders need TensorFlow at import time
                continue
            if name.split("/")[0] in tfds.core.registered.list_imported_builders():
                break
        return tfds.data_source(name, split=split, data_dir=data_dir)


def read_tfds(name: str, field: str, split: str, limit: Optional[int] = None, data_dir: Optional[str] = None) -> list[str]:
    """The `field` of the first `limit` (all when None) records of a TFDS dataset's split."""
    source = tfds_source(name, split, data_dir)
    count = len(source) if limit is None else min(limit, len(source))
    texts = []
    for index in range(count):
        record = source[index]
        if field not in record:
            raise ValueError(f"tfds:{name} records have no field {field!r} (they have {sorted(record)}); set the prompt field.")
        texts.append(_text(record[field], field, f"tfds:{name}[{split}]"))
    return texts


def read_texts(source: str, field: str, split: str, *, limit: Optional[int] = None,
               data_dir: Optional[str] = None) -> list[str]:
    """The prompt texts of `split` of a source `kind:location` (see the module docstring)."""
    kind, location = parse_source(source)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
        raise ValueError(f"limit={limit!r} must be a non-negative integer or None.")
    if kind == "tfds":
        return read_tfds(location, field, split, limit, data_dir)
    if kind == "inline":
        return read_inline(location)[:limit]
    reader = read_jsonl if kind == "jsonl" else read_parquet
    return reader(_for_split(location, split), field, limit)


class TokenizedPrompts(Sequence):
    """Tokenized prompts as a random-access prompt source: row i is
    {'prompt': tokens[i], 'prompt_mask': mask[i]} ([P] int32 each, left-padded)."""

    def __init__(self, prompts: Prompts):
        tokens, mask = np.asarray(prompts.tokens, np.int32), np.asarray(prompts.mask, np.int32)
        if tokens.ndim != 2 or mask.shape != tokens.shape:
            raise ValueError(f"prompt tokens {tokens.shape} and mask {mask.shape} must both be [num, P].")
        self.tokens, self.mask = tokens, mask

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"prompt": self.tokens[index], "prompt_mask": self.mask[index]}

    def __getitems__(self, rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
        return [self[int(i)] for i in rows]

    def batch(self, num: int) -> Prompts:
        """The first `num` rows (all if fewer) as a Prompts batch."""
        return Prompts(self.tokens[:num], self.mask[:num])


def tokenize_prompts(
    texts: Sequence[str],
    tokenizer: Tokenizer,
    max_length: int,
    *,
    chat: bool = False,
    system: Optional[str] = None,
    template: str = "{text}",
) -> TokenizedPrompts:
    """`template.format(text=t)` of every text, tokenized by `Tokenizer.encode_prompts` (left
    padding to `max_length`, truncation keeping the end; chat=True applies the chat template)."""
    if "{text}" not in template:
        raise ValueError(f"template={template!r} must contain '{{text}}' where the prompt text goes.")
    if len(texts) == 0:
        raise ValueError("the prompt set is empty; check the source, the split and the field.")
    return TokenizedPrompts(
        tokenizer.encode_prompts([template.format(text=t) for t in texts], max_length, chat=chat, system=system)
    )


def load_text_prompts(
    source: str,
    field: str,
    split: str,
    tokenizer: Tokenizer,
    max_length: int,
    *,
    chat: bool = False,
    system: Optional[str] = None,
    template: str = "{text}",
    limit: Optional[int] = None,
    data_dir: Optional[str] = None,
) -> TokenizedPrompts:
    """Reads the texts of `split` from `source` and tokenizes them once (see `tokenize_prompts`)."""
    texts = read_texts(source, field, split, limit=limit, data_dir=data_dir)
    return tokenize_prompts(texts, tokenizer, max_length, chat=chat, system=system, template=template)
