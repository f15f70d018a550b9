"""Smoke tests of the benchmark scripts (benchmarks/*.py --smoke) and exact checks of their arithmetic.

The scripts run in subprocesses on their tiny --smoke configs (online_step.py and exact_eval.py;
sampler.py --smoke runs the same sampler as online_step.py's); the tests check that each prints valid
JSON lines with the keys benchmarks/README.md documents and the counts the config implies. No timing
is asserted. The FLOP count and the workload reward are checked against hand computations, and the
sampler in the benchmarks' setting (EOS masked at every step) against a cache-free reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bond.models import TransformerConfig, count_params, init_params, logits
from bond.sampling import sample

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import online_step  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
from conftest import xla_flags

MACHINE_KEYS = {"backend", "cpu_count", "load_average_1m", "jax"}
ONLINE_STEP_KEYS = MACHINE_KEYS | {
    "algorithm", "s_per_step", "prompts_per_s", "tokens_per_s", "phases", "phases_sum_s", "compile_s",
    "first_call_s", "peak_rss_mb", "recompiles", "update_mfu", "update_gflops", "update_gflop", "update_sequences",
    "matmul_peak_gflops", "cpu_s", "call_s", "step_times_s", "new_tokens_per_step", "samples_per_prompt",
}
EXACT_EVAL_KEYS = MACHINE_KEYS | {
    "responses_per_s", "responses_per_prompt", "prompts", "eval_s", "compile_s", "first_call_s", "recompiles",
    "probability_sum_error", "peak_rss_mb", "cpu_s", "call_s",
}


def _run(script: str, *args: str) -> list[dict]:
    """Runs benchmarks/<script> in a fresh process (one CPU device) and parses its stdout's JSON lines."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags()
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(not online_step.DEFAULT_WORKLOAD.is_file(),
                    reason=f"the shared benchmark workload {online_step.DEFAULT_WORKLOAD} is not beside this checkout")
def test_online_step_smoke_prints_one_line_per_algorithm_with_the_documented_keys():
    (line,) = _run("online_step.py", "--smoke", "--algorithms=rloo")
    assert ONLINE_STEP_KEYS <= set(line)
    assert set(line["phases"]) == {"sample", "score", "logprobs", "update"}
    assert line["algorithm"] == "rloo" and line["registered_as"] == "reinforce"
    # Smoke config: 2 prompts x 2 policy samples x 4 new tokens; the update differentiates those 4 rows.
    assert line["new_tokens_per_step"] == 16
    assert line["update_sequences"] == 4
    assert line["recompiles"] == 0
    assert line["s_per_step"] > 0 and 0 < line["update_mfu"]


def test_exact_eval_smoke_enumerates_the_toy_language():
    (line,) = _run("exact_eval.py", "--smoke")
    assert EXACT_EVAL_KEYS <= set(line)
    # Vocabulary 9 (8 content tokens + EOS), responses of at most 5 tokens: Σ_{k<5} 8^k + 8^5.
    assert line["responses_per_prompt"] == sum(8**k for k in range(5)) + 8**5 == 37_449
    assert line["prompts"] == 2
    assert line["probability_sum_error"] < 1e-5


def test_matmul_params_are_the_workload_parameters_less_positions_biases_and_norms():
    # The workload's GPT-2: L = 4, d = 256, d_ff = 1024, V = 512, 128 positions; 3,323,392 parameters.
    model = TransformerConfig(vocab_size=512, num_layers=4, d_model=256, num_heads=4, d_ff=1024, max_len=128)
    total = count_params(jax.eval_shape(init_params, model, jax.random.key(0)))
    assert total == 3_323_392
    per_layer_biases_and_norms = (3 * 256 + 256) + (1024 + 256) + 2 * (2 * 256)  # qkv, out, mlp biases; 2 LNs
    not_in_matmuls = 128 * 256 + 4 * per_layer_biases_and_norms + 2 * 256  # positions, blocks, final LN
    assert online_step.matmul_params(model) == total - not_in_matmuls == 3_276_800
    # One prompt of 2 tokens with 3 samples of 2 response tokens (rows of 4): the prompt runs once
    # (2 tokens, 2 keys each), each sample feeds 1 response token (3 keys) and scores 2 positions.
    blocks, projection, attention = 6 * (3_276_800 - 512 * 256), 6 * 512 * 256, 12 * 4 * 256
    expected = blocks * (2 + 3) + projection * 3 * 2 + attention * (2 * 2 + 3 * 3)
    assert online_step.train_flops(model, (1, 3, 4), prompt_length=2) == expected


def test_even_token_reward_counts_only_the_counted_response_tokens():
    reward = online_step.even_token_reward(prompt_length=2)
    tokens = jnp.array([[7, 8, 2, 4, 5, 6], [1, 3, 3, 2, 0, 0]])
    response_mask = jnp.array([[0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
    # Row 0: responses 2, 4, 5, 6 -> 3 of 4 even. Row 1: 3, 2, 0 (EOS counted) -> 2 of 3 even.
    np.testing.assert_allclose(reward(tokens, response_mask), [0.75, 2 / 3], rtol=1e-6)


def test_sampler_with_eos_masked_draws_the_tokens_of_a_cache_free_reference():
    """The KV-cached sampler in the benchmarks' setting (min_new_tokens = max_new_tokens: EOS masked at
    every step) against ancestral sampling by full forward passes with the same uniforms.

    The sampler draws token t of row r by inverting the CDF of softmax(logits) with EOS masked at
    uniform U[t, r], U = uniform(key, (L, rows)); the reference recomputes every step's logits from
    scratch (no KV cache) and inverts the same CDF in float64.
    """
    config = TransformerConfig(vocab_size=8, num_layers=1, d_model=16, num_heads=2, d_ff=32, max_len=8)
    params = init_params(config, jax.random.key(0))
    params = {**params, "wte": {"embedding": params["wte"]["embedding"] * 4.0}}  # far from uniform
    prompts = np.array([[3, 5, 6], [0, 2, 7]], np.int32)
    mask = (prompts > 0).astype(np.int32)
    key, num_samples, length = jax.random.key(5), 3, 4
    out = sample(config, params, prompts, mask, key, num_samples=num_samples, max_new_tokens=length,
                 min_new_tokens=length)
    uniforms = np.asarray(jax.random.uniform(key, (length, prompts.shape[0] * num_samples)), np.float64)
    rows = np.repeat(prompts, num_samples, axis=0)
    # One fixed-shape forward per step (one compile): the not-yet-drawn slots hold a placeholder,
    # which causal attention keeps out of the logits at the last drawn position.
    tokens = np.concatenate([rows, np.ones((len(rows), length), np.int32)], 1)
    row_mask = np.concatenate([np.repeat(mask, num_samples, axis=0), np.ones((len(rows), length), np.int32)], 1)
    prompt_len = prompts.shape[1]
    for t in range(length):
        step_logits = np.asarray(logits(config, params, tokens, row_mask), np.float64)[:, prompt_len - 1 + t]
        step_logits[:, 0] = -np.inf  # EOS
        probs = np.exp(step_logits - step_logits.max(-1, keepdims=True))
        cdf = np.cumsum(probs, -1)
        tokens[:, prompt_len + t] = np.argmax(cdf > uniforms[t][:, None] * cdf[:, -1:], axis=-1)
    np.testing.assert_array_equal(np.asarray(out.tokens).reshape(len(rows), -1), tokens)
