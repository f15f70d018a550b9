"""Tests of bond.models.pretrained against tiny HF checkpoints (tests/fixtures/pretrained, made by
tests/make_pretrained_fixtures.py with transformers): logits and reward scores equal HF's, sampling,
log-probs and gradients run on every architecture, save -> load is exact, sharded loading equals
unsharded, and malformed checkpoints raise errors that name the tensor or field."""

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from bond.models import (
    TransformerConfig,
    load_pretrained,
    load_reward_model,
    logits,
    param_logical_axes,
    reward_scores,
    save_pretrained,
    sequence_logprobs,
)
from bond.models.pretrained import config_from_hf, config_to_hf
from bond.models.transformer import rope_frequencies
from bond.sampling import sample
from bond.sharding import make_mesh

FIXTURES = Path(__file__).parent / "fixtures" / "pretrained"
LANGUAGE_MODELS = ("gpt2", "llama", "gemma", "qwen2")


@pytest.fixture(scope="module")
def loaded():
    """Each fixture loaded once in float32: name -> (config, params)."""
    return {name: load_pretrained(FIXTURES / name, dtype="float32") for name in LANGUAGE_MODELS}


def _reference(name: str, file: str = "reference_logits.npz"):
    ref = np.load(FIXTURES / name / file)
    return ref["tokens"].astype(np.int32), ref["attention_mask"].astype(np.int32), ref


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_logits_match_transformers(loaded, name):
    # The reference rows: full, left-padded by 4 and by 1 (HF given position_ids = cumsum(mask) - 1,
    # our convention), right-padded by 3. Padded positions' outputs are never read, so not compared.
    config, params = loaded[name]
    tokens, mask, ref = _reference(name)
    out = np.asarray(logits(config, params, tokens, mask))
    assert out.shape == ref["logits"].shape and out.dtype == np.float32
    real = mask.astype(bool)
    np.testing.assert_allclose(out[real], ref["logits"][real], atol=1e-4, rtol=0)


def test_fixture_architectures_are_what_they_claim(loaded):
    llama, gemma, qwen2 = loaded["llama"][0], loaded["gemma"][0], loaded["qwen2"][0]
    assert (llama.num_heads, llama.kv_heads, llama.tie_embeddings) == (4, 2, False)
    assert (gemma.kv_heads, gemma.head_dim, gemma.d_model // gemma.num_heads) == (1, 32, 16)
    assert gemma.tie_embeddings and gemma.scale_embeddings and gemma.norm_unit_offset
    assert qwen2.qkv_bias and not qwen2.out_bias and qwen2.rope_theta == 1e6
    assert "wpe" not in loaded["llama"][1] and "lm_head" in loaded["llama"][1]
    assert "lm_head" not in loaded["gemma"][1]


# Compiling the sampler costs seconds per architecture, so it runs on the two attention layouts that
# are new to the codebase: grouped-query (llama: 4 heads, 2 kv heads) and multi-query with an explicit
# head width (gemma). GPT-2's cached decoding is covered by tests/test_sampling.py; qwen2 shares
# llama's attention code and gets the gradient test below.
@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_cached_sampling_logprobs_equal_sequence_logprobs(loaded, name):
    # The sampler decodes with the KV cache (num_kv_heads heads, rotated keys); sequence_logprobs
    # recomputes the same tokens in one full forward pass. At temperature 1 without filters their
    # log-probabilities must agree (float32 rounding only).
    config, params = loaded[name]
    prompts = jnp.array([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]], jnp.int32)
    prompt_mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.int32)
    out = sample(config, params, prompts, prompt_mask, jax.random.key(0), num_samples=2, max_new_tokens=4,
                 eos_id=1)
    assert out.tokens.shape == (2, 2, 9)
    _, seq_lp = sequence_logprobs(params, out.tokens, out.response_mask, model=config,
                                  attention_mask=out.attention_mask)
    np.testing.assert_allclose(seq_lp, out.logprobs.sum(-1), atol=1e-4)


def test_gradient_step_is_finite():
    # qwen2 (q/k/v biases, no output bias): every parameter, biases included, gets a finite,
    # non-zero gradient of the summed response log-likelihood, and a step changes the logits.
    config, params = load_pretrained(FIXTURES / "qwen2", dtype="float32")
    tokens, mask, _ = _reference("qwen2")
    response_mask = mask * (np.arange(tokens.shape[1]) >= 6)

    def total_logprob(p):
        return sequence_logprobs(p, tokens, response_mask, model=config, attention_mask=mask)[1].sum()

    grads = jax.jit(jax.grad(total_logprob))(params)
    norms = {"/".join(k.key for k in path): float(jnp.linalg.norm(g))
             for path, g in jax.tree_util.tree_leaves_with_path(grads)}
    assert "blocks_1/attn/query/bias" in norms and "blocks_1/attn/out/bias" not in norms
    assert all(np.isfinite(n) and n > 0 for n in norms.values()), norms
    stepped = jax.tree.map(lambda p, g: p + 1e-2 * g, params, grads)
    before, after = logits(config, params, tokens, mask), logits(config, stepped, tokens, mask)
    assert np.all(np.isfinite(np.asarray(after))) and not np.allclose(before, after)


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_save_then_load_is_exact(loaded, name, tmp_path):
    config, params = loaded[name]
    save_pretrained(config, params, tmp_path)
    again_config, again = load_pretrained(tmp_path)
    assert again_config == config
    assert jax.tree.structure(again) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_loading_and_round_trip(tmp_path):
    # gemma's weights are stored in bfloat16 with torch_dtype bfloat16: dtype=None keeps bfloat16;
    # llama's are float32 and dtype='bfloat16' converts them slice by slice.
    config, params = load_pretrained(FIXTURES / "gemma")
    assert config.param_dtype == jnp.bfloat16 and config.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    save_pretrained(config, params, tmp_path)
    header = _read_header(tmp_path / "model.safetensors")
    assert {entry["dtype"] for entry in header.values()} == {"BF16"}
    _, again = load_pretrained(tmp_path)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

    llama_config, llama = load_pretrained(FIXTURES / "llama", dtype="bfloat16")
    _, llama32 = load_pretrained(FIXTURES / "llama", dtype="float32")
    assert {leaf.dtype for leaf in jax.tree.leaves(llama)} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(llama), jax.tree.leaves(llama32)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16))
    shape = jax.eval_shape(lambda p: logits(llama_config, p, jnp.ones((1, 3), jnp.int32)), llama)
    assert shape.dtype == jnp.float32 and shape.shape == (1, 3, llama_config.vocab_size)


def test_saved_folder_loads_in_transformers(loaded, tmp_path):
    torch = pytest.importorskip("torch", reason="the HF cross-check needs torch: pip install -e '.[bench]'")
    transformers = pytest.importorskip("transformers", reason="the HF cross-check needs transformers: pip install -e '.[bench]'")
    for name in ("llama", "gemma"):
        config, params = loaded[name]
        save_pretrained(config, params, tmp_path / name)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32,
                                                                  attn_implementation="eager")
        tokens, mask, ref = _reference(name)
        with torch.no_grad():
            out = model(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                        position_ids=torch.tensor(np.maximum(np.cumsum(mask, 1) - 1, 0))).logits.numpy()
        real = mask.astype(bool)
        np.testing.assert_allclose(out[real], ref["logits"][real], atol=1e-4, rtol=0)


def test_sharded_loading_matches_unsharded(loaded):
    mesh_shape = (2, 2, 2)  # data x fsdp x tensor over the 8 fake CPU devices (tests/conftest.py)
    mesh = make_mesh(mesh_shape)
    config, params = load_pretrained(FIXTURES / "llama", dtype="float32", mesh=mesh)
    embedding = params["wte"]["embedding"]  # [vocab, embed]: split over tensor and fsdp
    assert embedding.sharding.mesh.shape == mesh.shape
    assert {s.data.shape for s in embedding.addressable_shards} == {
        (config.vocab_size // mesh_shape[2], config.d_model // mesh_shape[1])}
    key = params["blocks_0"]["attn"]["key"]["kernel"]  # [embed, kv heads = 2, head_dim]
    assert {s.data.shape[1] for s in key.addressable_shards} == {2 // mesh_shape[2]}
    tokens, mask, _ = _reference("llama")
    with jax.set_mesh(mesh):
        sharded = logits(config, params, tokens, mask)
    unsharded = logits(config, loaded["llama"][1], tokens, mask)
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(unsharded), atol=1e-5)


def test_reward_model_scores_match_transformers():
    config, params = load_reward_model(FIXTURES / "llama_reward", dtype="float32")
    tokens, mask, ref = _reference("llama_reward", "reference_scores.npz")
    scores = reward_scores(config, params, tokens, mask)
    assert scores.shape == (4,) and scores.dtype == jnp.float32
    np.testing.assert_allclose(scores, ref["scores"], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Malformed checkpoints


def _read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def _rewrite_safetensors(path: Path, edit) -> None:
    """Rewrites a safetensors file after edit(tensors: dict name -> array) changed it in place."""
    header = _read_header(path)
    data = path.read_bytes()
    start = 8 + struct.unpack("<Q", data[:8])[0]
    tensors = {}
    for name, entry in header.items():
        assert entry["dtype"] == "F32"
        begin, end = entry["data_offsets"]
        tensors[name] = np.frombuffer(data[start + begin:start + end], np.float32).reshape(entry["shape"])
    edit(tensors)
    new_header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array, np.float32).tobytes()
        new_header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(new_header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def _copy(name: str, tmp_path: Path) -> Path:
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_tensor_is_named(tmp_path):
    folder = _copy("gpt2", tmp_path)
    _rewrite_safetensors(folder / "model.safetensors", lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'transformer\.h\.1\.mlp\.c_fc\.weight'"):
        load_pretrained(folder)


def test_unexpected_tensor_is_named(tmp_path):
    folder = _copy("gpt2", tmp_path)
    _rewrite_safetensors(folder / "model.safetensors",
                         lambda t: t.update({"transformer.h.2.ln_1.weight": np.ones(64, np.float32)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'transformer\.h\.2\.ln_1\.weight'"):
        load_pretrained(folder)


def test_wrong_shape_is_named_with_expected_and_got(tmp_path):
    folder = _copy("llama", tmp_path)
    _edit_config(folder, lambda c: c.update(intermediate_size=96))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(128, 64\) "
                                         r"in the checkpoint, expected \(96, 64\)"):
        load_pretrained(folder)


def test_unknown_model_type_and_architecture_list_the_supported_ones(tmp_path):
    folder = _copy("gpt2", tmp_path)
    _edit_config(folder, lambda c: c.update(model_type="bert"))
    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported; supported model types: gpt2, llama"):
        load_pretrained(folder)
    _edit_config(folder, lambda c: c.update(model_type="gpt2", architectures=["GPT2ForTokenClassification"]))
    with pytest.raises(ValueError, match=r"'GPT2ForTokenClassification' is not supported .*GPT2LMHeadModel"):
        load_pretrained(folder)
    with pytest.raises(ValueError, match="load_reward_model"):
        load_pretrained(FIXTURES / "llama_reward")
    with pytest.raises(ValueError, match="load_pretrained"):
        load_reward_model(FIXTURES / "llama")


def test_missing_config_field_or_file_is_named(tmp_path):
    folder = _copy("llama", tmp_path)
    _edit_config(folder, lambda c: c.pop("hidden_size"))
    with pytest.raises(ValueError, match=r"config\.json is missing field 'hidden_size'"):
        load_pretrained(folder)
    (folder / "model-00002-of-00004.safetensors").unlink()
    _edit_config(folder, lambda c: c.update(hidden_size=64))
    with pytest.raises(ValueError, match=r"'model-00002-of-00004\.safetensors'"):
        load_pretrained(folder)
    with pytest.raises(ValueError, match="no config.json"):
        load_pretrained(FIXTURES)
    with pytest.raises(ValueError, match="dtype"):
        load_pretrained(FIXTURES / "gpt2", dtype="int8")


def test_config_from_hf_mistral_window_and_unsupported_rope():
    mistral = {"model_type": "mistral", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
               "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 4096, "sliding_window": 1024, "rope_theta": 1e6}
    config = config_from_hf(mistral)
    # Sliding-window attention equals full attention up to the window: max_len is capped there.
    assert (config.max_len, config.kv_heads, config.rope_theta, config.activation) == (1024, 2, 1e6, "silu")
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        config_from_hf(mistral | {"rope_scaling": {"rope_type": "yarn", "factor": 8.0}})
    with pytest.raises(ValueError, match="missing field 'low_freq_factor'"):
        config_from_hf(mistral | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


LLAMA31_CONFIG = {"model_type": "llama", "vocab_size": 32, "hidden_size": 256, "intermediate_size": 32,
                  "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 131072,
                  "rope_parameters": LLAMA31_ROPE}


def test_llama3_rope_frequencies():
    config = config_from_hf(LLAMA31_CONFIG)
    plain = np.asarray(rope_frequencies(dataclasses.replace(config, rope_scaling=())))
    scaled = np.asarray(rope_frequencies(config))
    wavelength = 2 * np.pi / plain
    # Short wavelengths (< 8192 / 4) keep their frequency, long ones (> 8192 / 1) are divided by 8,
    # the band between interpolates strictly between the two.
    short, long = wavelength < 2048, wavelength > 8192
    assert short.sum() > 0 and long.sum() > 0 and (~short & ~long).sum() > 0
    np.testing.assert_array_equal(scaled[short], plain[short])
    np.testing.assert_allclose(scaled[long], plain[long] / 8, rtol=1e-6)
    band = ~short & ~long
    assert np.all((scaled[band] < plain[band]) & (scaled[band] > plain[band] / 8))
    assert config_to_hf(config)["rope_parameters"] == LLAMA31_ROPE
    assert config_from_hf(config_to_hf(config)) == config


def test_llama3_rope_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers", reason="the HF cross-check needs transformers: pip install -e '.[bench]'")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    reference, _ = ROPE_INIT_FUNCTIONS["llama3"](transformers.LlamaConfig(**LLAMA31_CONFIG), "cpu")
    np.testing.assert_allclose(rope_frequencies(config_from_hf(LLAMA31_CONFIG)), reference.numpy(), rtol=1e-6)


def test_new_architecture_fields_validate_and_name_every_axis(loaded):
    base = dict(vocab_size=16, num_layers=1, d_model=32, num_heads=4, d_ff=8, max_len=8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        TransformerConfig(**base, num_kv_heads=3)
    with pytest.raises(ValueError, match="norm"):
        TransformerConfig(**base, norm="batch_norm")
    with pytest.raises(ValueError, match="norm_unit_offset"):
        TransformerConfig(**base, norm_unit_offset=True)
    with pytest.raises(ValueError, match="position_embedding"):
        TransformerConfig(**base, position_embedding="alibi")
    with pytest.raises(ValueError, match="even head_dim"):
        TransformerConfig(**base, position_embedding="rope", explicit_head_dim=7)
    # An explicit head width lifts the d_model % num_heads constraint (Gemma).
    assert TransformerConfig(**(base | {"d_model": 30}), explicit_head_dim=8).head_dim == 8
    for name in LANGUAGE_MODELS:
        config, params = loaded[name]
        axes = param_logical_axes(config)
        assert jax.tree.structure(axes) == jax.tree.structure(params)
        for spec, leaf in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, PartitionSpec)),
                              jax.tree.leaves(params)):
            assert len(spec) == leaf.ndim and set(spec) <= {"vocab", "embed", "mlp", "heads", "kv", "position"}
