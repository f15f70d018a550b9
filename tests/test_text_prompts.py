"""Text prompt sets: JSONL, parquet and a mock TFDS dataset flow through the prompt pipeline to [B, P] arrays."""

import json

import numpy as np
import pytest

from bond.tasks.prompts import batch_rows, read_prompt_rows
from bond.tasks.text import TokenizedPrompts, load_text_prompts, parse_source, read_texts, tokenize_prompts
from bond.tokenizer import load_tokenizer
from test_tokenizer import make_bpe_folder

TEXTS = ["the quick brown fox", "hello there", "summarize the following document in one sentence"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_bpe_folder(tmp_path_factory.mktemp("tok")))


def expected_rows(tokenizer, texts, length):
    """The layout by hand: each text's ids right-aligned in a row of pad ids, mask 1 on them; a long
    prompt keeps its BOS and its last length − 1 ids."""
    tokens = np.full((len(texts), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if len(ids) > length:
            ids = ids[:1] + ids[len(ids) - length + 1 :]
        tokens[row, length - len(ids):] = ids
        mask[row, length - len(ids):] = 1
    return tokens, mask


def test_jsonl_prompts_reach_left_padded_batches(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": t, "id": i}) for i, t in enumerate(TEXTS)) + "\n\n")
    source = load_text_prompts(f"jsonl:{tmp_path}/{{split}}.jsonl", "prompt", "train", tokenizer, 12)
    assert isinstance(source, TokenizedPrompts) and len(source) == 3
    tokens, mask = expected_rows(tokenizer, TEXTS, 12)
    # as the runner reads step 2's prompts of batch 4: rows (2·4 + i) mod 3
    batch = read_prompt_rows(source, batch_rows(2, 4, len(source)))
    rows = [2, 0, 1, 2]
    assert batch.tokens.dtype == np.int32 and batch.tokens.shape == (4, 12)
    np.testing.assert_array_equal(batch.tokens, tokens[rows])
    np.testing.assert_array_equal(batch.mask, mask[rows])
    assert read_texts(f"jsonl:{path}", "prompt", "eval", limit=2) == TEXTS[:2]  # no {split}: the file serves every split


def test_parquet_prompts(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": TEXTS, "n": [1, 2, 3]}), tmp_path / "p.parquet")
    assert read_texts(f"parquet:{tmp_path}/p.parquet", "text", "train") == TEXTS
    assert read_texts(f"parquet:{tmp_path}/p.parquet", "text", "train", limit=1) == TEXTS[:1]
    source = load_text_prompts(f"parquet:{tmp_path}/p.parquet", "text", "train", tokenizer, 8, template="Q: {text}")
    tokens, mask = expected_rows(tokenizer, [f"Q: {t}" for t in TEXTS], 8)
    np.testing.assert_array_equal(source.tokens, tokens)
    np.testing.assert_array_equal(source.mask, mask)
    with pytest.raises(ValueError, match="no column 'prompt'"):
        read_texts(f"parquet:{tmp_path}/p.parquet", "prompt", "train")


def test_mock_tfds_xsum_flows_through_the_prompt_pipeline(tokenizer):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        documents = read_texts("tfds:xsum", "document", "train")
        source = load_text_prompts("tfds:xsum", "document", "train", tokenizer, 10, limit=4)
        with pytest.raises(ValueError, match="no field 'prompt'"):
            read_texts("tfds:xsum", "prompt", "validation", limit=1)
    assert len(documents) == 6 and all(isinstance(d, str) and d for d in documents)
    assert len(source) == 4
    tokens, mask = expected_rows(tokenizer, documents[:4], 10)
    batch = read_prompt_rows(source, range(4))
    np.testing.assert_array_equal(batch.tokens, tokens)
    np.testing.assert_array_equal(batch.mask, mask)


def test_chat_prompts_and_source_errors(tmp_path, tokenizer):
    chat = tokenize_prompts(["hello there"], tokenizer, 40, chat=True)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}]),
                           add_special_tokens=False)
    assert chat.tokens[0, -len(ids):].tolist() == ids and chat.mask[0].sum() == len(ids)
    for bad in ("xsum", "hf:xsum", "jsonl:"):
        with pytest.raises(ValueError, match="kind:location"):
            parse_source(bad)
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        read_texts(f"jsonl:{tmp_path}/missing.jsonl", "prompt", "train")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"line 1 .* no field 'prompt'"):
        read_texts(f"jsonl:{tmp_path}/bad.jsonl", "prompt", "train")
    with pytest.raises(ValueError, match="empty"):
        tokenize_prompts([], tokenizer, 4)
    with pytest.raises(ValueError, match="template"):
        tokenize_prompts(["x"], tokenizer, 4, template="no placeholder")
