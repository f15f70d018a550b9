"""Tokenizers of checkpoint folders: HF tokenizer.json and SentencePiece, special ids, chat templates, layout.

The tokenizers are trained here in tmp folders (a byte-level BPE with the `tokenizers` library,
a SentencePiece model with `sentencepiece`), so nothing is downloaded and no torch/transformers is needed.
"""

import io
import json

import numpy as np
import pytest

from bond.tokenizer import Tokenizer, TokenizerError, load_tokenizer, truncate_keeping_end

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "summarize the following document in one sentence",
    "a best of n sample is the response the reward model likes most",
    "hello there, how are you today? fine, thanks.",
] * 4

# A Gemma-style template written out by hand (the checkpoint's tokenizer_config.json stores such a string).
TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}\n"
    "    {% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}\n"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def make_bpe_folder(folder, *, chat_template=TEMPLATE, add_bos_processor=True):
    """A checkpoint-like folder with a byte-level BPE tokenizer.json and tokenizer_config.json.

    Special tokens: <pad> 0, <s> 1, </s> 2, <start_of_turn> 3, <end_of_turn> 4. With
    add_bos_processor the post-processor prepends <s> (as Llama's tokenizer.json does).
    """
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"]
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    if add_bos_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def make_sentencepiece_folder(folder):
    """A folder with only a SentencePiece tokenizer.model (Gemma's ids: pad 0, eos 1, bos 2, unk 3) and
    <start_of_turn> / <end_of_turn> as control symbols listed in tokenizer_config.json's added_tokens_decoder."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model, vocab_size=80, model_type="bpe",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, control_symbols=["<start_of_turn>", "<end_of_turn>"],
        normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    added = {"4": {"content": "<start_of_turn>", "special": True}, "5": {"content": "<end_of_turn>", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added, "chat_template": TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Tokenizer:
    return load_tokenizer(make_bpe_folder(tmp_path_factory.mktemp("bpe")))


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> Tokenizer:
    return load_tokenizer(make_sentencepiece_folder(tmp_path_factory.mktemp("sp")))


def test_bpe_special_ids_and_round_trip(bpe):
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
    text = "hello there, the quick fox!"
    ids = bpe.encode(text)
    assert ids[0] == 1 and ids.count(1) == 1  # BOS once, from the post-processor
    assert bpe.decode(ids[1:]) == text
    assert bpe.encode(text, add_special_tokens=False) == ids[1:]


def test_sentencepiece_special_ids_bos_and_control_symbols(sp):
    assert (sp.pad_id, sp.eos_id, sp.bos_id) == (0, 1, 2)
    text = "the lazy dog"
    ids = sp.encode(text)
    assert ids[0] == 2 and ids.count(2) == 1  # SentencePiece checkpoints add BOS by default
    assert sp.decode(ids[1:]) == text
    # Special tokens written in text (as a chat template writes them) become their single ids.
    ids = sp.encode("<start_of_turn>user\nthe dog<end_of_turn>", add_special_tokens=False)
    assert ids[0] == 4 and ids[-1] == 5 and 4 not in ids[1:-1]
    assert ids[1:-1] == sp.encode("user\nthe dog", add_special_tokens=False)


def test_chat_template_renders_like_hand_written_string(bpe, sp):
    messages = [
        {"role": "user", "content": " Hello there "},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Summarize."},
    ]
    expected = (
        "<s><start_of_turn>user\nHello there<end_of_turn>\n"
        "<start_of_turn>model\nHi.<end_of_turn>\n"
        "<start_of_turn>user\nSummarize.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert bpe.apply_chat_template(messages) == expected
    assert bpe.apply_chat_template(messages, add_generation_prompt=False) == expected[: -len("<start_of_turn>model\n")]
    assert sp.apply_chat_template(messages[:1]) == "<start_of_turn>user\nHello there<end_of_turn>\n<start_of_turn>model\n"


def test_chat_prompts_encode_the_rendered_template_without_extra_bos(bpe):
    prompts = bpe.encode_prompts(["the dog"], 40, chat=True)
    rendered = "<s><start_of_turn>user\nthe dog<end_of_turn>\n<start_of_turn>model\n"
    ids = bpe.encode(rendered, add_special_tokens=False)
    assert ids[:2] == [1, 3] and ids.count(1) == 1
    assert prompts.tokens[0, -len(ids):].tolist() == ids
    assert prompts.mask[0].sum() == len(ids)


def test_encode_prompts_left_pads_with_the_pad_id_and_masks(bpe):
    texts = ["the dog", "hello there, how are you today?"]
    prompts = bpe.encode_prompts(texts, 40)
    assert prompts.tokens.shape == prompts.mask.shape == (2, 40)
    assert prompts.tokens.dtype == prompts.mask.dtype == np.int32
    for row, text in enumerate(texts):
        ids = bpe.encode(text)
        n = len(ids)
        assert 2 <= n < 40
        assert prompts.tokens[row, 40 - n:].tolist() == ids  # right-aligned: left padding
        assert (prompts.tokens[row, : 40 - n] == bpe.pad_id).all()
        assert prompts.mask[row].tolist() == [0] * (40 - n) + [1] * n


def test_truncation_keeps_bos_and_the_end(bpe):
    text = "a best of n sample is the response the reward model likes most"
    ids = bpe.encode(text)
    prompts = bpe.encode_prompts([text], 6)
    assert prompts.tokens[0].tolist() == [ids[0]] + ids[-5:]
    assert prompts.mask[0].tolist() == [1] * 6
    assert truncate_keeping_end([7, 8, 9], 2, bos_id=None) == [8, 9]
    assert truncate_keeping_end([1, 8, 9, 10], 3, bos_id=1) == [1, 9, 10]
    assert truncate_keeping_end([1, 8], 3, bos_id=1) == [1, 8]


def test_decode_responses_reads_the_response_mask_and_drops_eos(bpe):
    hello = bpe.encode("hello there", add_special_tokens=False)
    dog = bpe.encode("the dog", add_special_tokens=False)
    p = 3
    tokens = np.zeros((2, p + 8), np.int32)
    response_mask = np.zeros((2, p + 8), np.float32)
    tokens[0, p : p + len(hello) + 1] = hello + [bpe.eos_id]
    response_mask[0, p : p + len(hello) + 1] = 1
    tokens[1, p : p + len(dog)] = dog  # cut by the length limit: no EOS
    tokens[1, p + len(dog) :] = 5  # after the counted tokens: ignored
    response_mask[1, p : p + len(dog)] = 1
    assert bpe.decode_responses(tokens, response_mask) == ["hello there", "the dog"]
    with pytest.raises(ValueError, match=r"reshape"):
        bpe.decode_responses(tokens[None], response_mask[None])


def test_ids_beyond_the_tokenizer_vocabulary_are_dropped_when_decoding(bpe):
    ids = bpe.encode("the dog", add_special_tokens=False)
    assert bpe.decode(ids + [bpe.vocab_size + 5]) == "the dog"


def test_special_ids_fall_back_to_config_json_and_eos_can_be_overridden(tmp_path):
    folder = make_bpe_folder(tmp_path / "gpt2like", chat_template=None, add_bos_processor=False)
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 4]}))
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # first EOS of the list; PAD falls back to EOS
    assert tok.chat_template is None
    assert tok.encode("the dog")[0] != 1  # no post-processor, no add_bos_token: no BOS
    assert load_tokenizer(folder, eos_token="<end_of_turn>").eos_id == 4
    with pytest.raises(ValueError, match="no chat template"):
        tok.encode_prompts(["x"], 4, chat=True)


def test_chat_template_file_and_named_templates(tmp_path):
    folder = make_bpe_folder(tmp_path / "named", chat_template=[{"name": "default", "template": "{{ messages[0]['content'] }}!"}])
    assert load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    (folder / "chat_template.jinja").write_text("[{{ messages[0]['content'] }}]")
    assert load_tokenizer(folder).apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"


def test_bad_inputs_name_the_problem(tmp_path, bpe):
    with pytest.raises(TokenizerError, match="has no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer(tmp_path / "missing")
    folder = make_bpe_folder(tmp_path / "badeos")
    with pytest.raises(TokenizerError, match="not in the tokenizer's vocabulary"):
        load_tokenizer(folder, eos_token="<nope>")
    with pytest.raises(ValueError, match="max_length"):
        bpe.encode_prompts(["x"], 0)
    with pytest.raises(ValueError, match="not one string"):
        bpe.encode_prompts("x", 4)
    empty = load_tokenizer(make_bpe_folder(tmp_path / "nobos", add_bos_processor=False))
    with pytest.raises(ValueError, match="encodes to no tokens"):
        empty.encode_prompts([""], 4)
