"""Makes the tiny HF checkpoints under tests/fixtures/pretrained/ (not run by the test suite).

    python tests/make_pretrained_fixtures.py

Needs torch, transformers (5.x), tokenizers and sentencepiece. Every fixture is a random 2-layer model
(d_model 64) saved by transformers' own `save_pretrained`, with its tokenizer and
`reference_logits.npz`: HF's float32 outputs on a few fixed inputs, one of them left-padded (HF gets
position_ids = cumsum(mask) - 1 explicitly, the codebase's convention) and one right-padded.

  gpt2          GPT2LMHeadModel, tied embeddings, byte-level BPE tokenizer.json
  llama         LlamaForCausalLM, grouped-query attention (4 heads, 2 kv heads), untied, sharded
                (model.safetensors.index.json), tokenizer.json + tokenizer_config.json with a chat_template
  gemma         GemmaForCausalLM, tied, embedding scaling, multi-query attention, head_dim 32 != 64 / 4,
                weights stored in bfloat16 (torch_dtype bfloat16), SentencePiece tokenizer.model
  qwen2         Qwen2ForCausalLM, q/k/v biases, tied
  llama_reward  LlamaForSequenceClassification, num_labels 1, pad_token_id 0: reference_scores.npz

Weights are redrawn with std 1 / sqrt(fan_in) (embeddings 1 / sqrt(d_model), norm scales around 1),
so that logits vary by O(1) across tokens and a wrong layout (rope pairing, head order, transposes) shows far above 1e-4.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = Path(__file__).resolve().parent / "fixtures" / "pretrained"
VOCAB_SIZE = 384
SEQ_LEN = 12

CORPUS = """\
The best-of-N sampling strategy draws N responses from a language model and keeps the one with the
highest reward. It is simple, strong and expensive: every prompt costs N generations at inference time.
Distillation asks a single policy to match the distribution of the best-of-N sampler, so that one
sample from the new policy is as good as the best of many samples from the old one.

A small cat sat on the warm mat near the kitchen door. The dog in the garden watched the birds, and
the birds watched the clouds drift over the hills. In the evening the children read stories about
ships, islands and the long summer by the sea.

Researchers measure the quality of a policy by its reward and by its distance from the reference
model. A good method moves along the frontier: more reward for the same divergence. Each experiment
is repeated with several seeds, and the tables report the mean and the spread of every metric.

Question: what is the capital of France? Answer: Paris is the capital of France. Question: how many
legs does a spider have? Answer: a spider has eight legs. Summarize the article in one sentence.
Write a short poem about the rain. Translate the sentence into German. Explain the idea simply.
"""

LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def byte_level_bpe(special_tokens: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) trained on CORPUS; special tokens get ids 0, 1, ..."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.split("\n"), trainer=trainer)
    assert tokenizer.get_vocab_size() == vocab_size, tokenizer.get_vocab_size()
    return tokenizer


def sentencepiece_model(folder: Path) -> int:
    """Trains a SentencePiece BPE model (Gemma's ids: pad 0, eos 1, bos 2, unk 3) into folder/tokenizer.model."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        # Relative paths: the trainer spec stored in the model records them, so the file stays deterministic.
        Path("corpus.txt").write_text(CORPUS)
        spm.SentencePieceTrainer.train(
            input="corpus.txt",
            model_prefix="tokenizer",
            num_threads=1,
            model_type="bpe",
            vocab_size=VOCAB_SIZE,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
            byte_fallback=True,
            character_coverage=1.0,
            hard_vocab_limit=True,
            normalization_rule_name="identity",
            minloglevel=2,
        )
        shutil.copy(Path(tmp) / "tokenizer.model", folder / "tokenizer.model")
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).get_piece_size()


@torch.no_grad()
def randomize(model: torch.nn.Module, generator: torch.Generator, gemma_norms: bool = False) -> None:
    """Redraws every parameter: weights N(0, 1 / fan_in), biases N(0, 0.1^2), norm scales 1 + N(0, 0.1^2)
    (Gemma's (1 + w) scales: w ~ N(0, 0.1^2)), embeddings N(0, 1 / d_model)."""
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
            param.copy_(0.1 * noise + (0.0 if gemma_norms else 1.0))
        elif param.ndim == 1:
            param.copy_(0.1 * noise)
        elif "wte" in name or "wpe" in name or "embed" in name:
            param.copy_(noise / math.sqrt(param.shape[1]))
        else:
            # nn.Linear stores [out, in], GPT-2's Conv1D [in, out].
            fan_in = param.shape[0] if "c_attn" in name or "c_fc" in name or "c_proj" in name else param.shape[1]
            param.copy_(noise / math.sqrt(fan_in))


def reference_inputs(vocab_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and attention mask [4, SEQ_LEN]: full, left-padded by 4, left-padded by 1, right-padded by 3.

    Real tokens avoid id 0 (PAD), so HF's sequence classifier finds the same last token as the mask.
    """
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab_size, size=(4, SEQ_LEN)).astype(np.int64)
    mask = np.ones((4, SEQ_LEN), np.int64)
    mask[1, :4] = 0
    mask[2, :1] = 0
    mask[3, -3:] = 0
    tokens[mask == 0] = 0
    return tokens, mask


def hf_outputs(model: torch.nn.Module, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    out = model.float().eval()(
        input_ids=torch.tensor(tokens),
        attention_mask=torch.tensor(mask),
        position_ids=torch.tensor(positions),
    )
    return out.logits.detach().numpy().astype(np.float32)


def save(model, folder: Path, tokens: np.ndarray, mask: np.ndarray, reward: bool = False,
         weights_dtype: torch.dtype = torch.float32, **save_kwargs) -> None:
    """Reference outputs of the float32 model, then its weights in `weights_dtype`."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    outputs = hf_outputs(model, tokens, mask)
    if reward:
        np.savez(folder / "reference_scores.npz", tokens=tokens, attention_mask=mask, scores=outputs[:, 0])
    else:
        np.savez(folder / "reference_logits.npz", tokens=tokens, attention_mask=mask, logits=outputs)
    model.to(weights_dtype).save_pretrained(folder, **save_kwargs)


def save_fast_tokenizer(tokenizer: Tokenizer, folder: Path, chat_template: str | None = None, **special) -> None:
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
    fast.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if chat_template is not None:
        config["chat_template"] = chat_template
    # The class name that transformers 4 and 5 both resolve (5 writes its own "TokenizersBackend").
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for extra in ("chat_template.jinja", "special_tokens_map.json"):
        (folder / extra).unlink(missing_ok=True)


def make_gpt2(generator: torch.Generator) -> None:
    folder = OUT / "gpt2"
    config = transformers.GPT2Config(
        vocab_size=VOCAB_SIZE, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=128,
        activation_function="gelu_new", tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    randomize(model, generator)
    tokens, mask = reference_inputs(VOCAB_SIZE, seed=0)
    save(model, folder, tokens, mask)
    save_fast_tokenizer(byte_level_bpe(["<|endoftext|>"]), folder, bos_token="<|endoftext|>",
                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _llama_config(**overrides) -> transformers.LlamaConfig:
    fields = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=0, pad_token_id=0, attn_implementation="eager",
    )
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)


LLAMA_SPECIAL = ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def make_llama(generator: torch.Generator) -> None:
    folder = OUT / "llama"
    model = transformers.LlamaForCausalLM(_llama_config())
    randomize(model, generator)
    tokens, mask = reference_inputs(VOCAB_SIZE, seed=1)
    save(model, folder, tokens, mask, max_shard_size="150KB")
    assert (folder / "model.safetensors.index.json").exists(), "the llama fixture must be sharded"
    save_fast_tokenizer(byte_level_bpe(LLAMA_SPECIAL), folder, chat_template=LLAMA_CHAT_TEMPLATE,
                        bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")


def make_llama_reward(generator: torch.Generator) -> None:
    folder = OUT / "llama_reward"
    config = _llama_config(num_labels=1, architectures=["LlamaForSequenceClassification"])
    model = transformers.LlamaForSequenceClassification(config)
    randomize(model, generator)
    tokens, mask = reference_inputs(VOCAB_SIZE, seed=2)
    save(model, folder, tokens, mask, reward=True)
    save_fast_tokenizer(byte_level_bpe(LLAMA_SPECIAL), folder, chat_template=LLAMA_CHAT_TEMPLATE,
                        bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|end_of_text|>")


def make_gemma(generator: torch.Generator) -> None:
    folder = OUT / "gemma"
    with tempfile.TemporaryDirectory() as tmp:
        vocab_size = sentencepiece_model(Path(tmp))
        config = transformers.GemmaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-6,
            hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
            bos_token_id=2, attn_implementation="eager",
        )
        model = transformers.GemmaForCausalLM(config)
        randomize(model, generator, gemma_norms=True)
        # Stored in bfloat16 like the released checkpoints; the reference is the float32 model of the
        # bfloat16-rounded weights. (Not model.to(bfloat16).float(): that also rounds the rotary
        # inv_freq buffer.)
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(torch.bfloat16).float())
        tokens, mask = reference_inputs(vocab_size, seed=3)
        save(model, folder, tokens, mask, weights_dtype=torch.bfloat16)
        shutil.copy(Path(tmp) / "tokenizer.model", folder / "tokenizer.model")
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "chat_template": GEMMA_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")


def make_qwen2(generator: torch.Generator) -> None:
    folder = OUT / "qwen2"
    config = transformers.Qwen2Config(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=0, eos_token_id=0,
        attn_implementation="eager",
    )
    model = transformers.Qwen2ForCausalLM(config)
    randomize(model, generator)
    tokens, mask = reference_inputs(VOCAB_SIZE, seed=4)
    save(model, folder, tokens, mask)
    save_fast_tokenizer(byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]), folder,
                        bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    for make in (make_gpt2, make_llama, make_gemma, make_qwen2, make_llama_reward):
        make(generator)
    for folder in sorted(OUT.iterdir()):
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{folder.name:14s} {size / 1024:7.1f} KiB  {sorted(f.name for f in folder.iterdir())}")


if __name__ == "__main__":
    main()
