"""Exact-evaluation throughput: log π(y|x) of every response of the toy language, for 16 eval prompts.

The default task (bond/tasks/toy_language.py: vocabulary 9 with EOS, responses of at most 5 tokens,
37,449 responses per prompt) and the default policy architecture of bond/config_base.py (2 layers,
d_model 64, 4 heads, d_ff 256, float32; random weights: the work does not depend on them).
`bond.exact.response_logprobs` walks the response trie with a KV cache in batched jitted passes.

    python benchmarks/exact_eval.py            # 16 prompts
    python benchmarks/exact_eval.py --smoke    # 2 prompts and a 1-layer model: checks that the script runs

Prints one JSON line: responses_per_s (prompts x responses per prompt / median seconds of one
evaluation), eval_s, compile_s (trace + lower + compile seconds of the first call, from jax.monitoring),
first_call_s, probability_sum_error (max over prompts of |Σ_y π(y|x) − 1|), peak_rss_mb, cpu_s / call_s,
load_average_1m. Timing: 1 warm-up call, then the median of 5 timed calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bond import exact
from bond.config_base import base_config
from bond.models import TransformerConfig, init_params
from bond.tasks import DEFAULT_TASK, get_task

from common import CompileLog, machine, median_time, peak_rss_mb


def evaluation_model(task, smoke: bool) -> TransformerConfig:
    """The default config's policy architecture for `task` (bond.stages.model_config), or a 1-layer one for --smoke."""
    m = base_config().model
    if smoke:
        m.update(num_layers=1, d_model=16, num_heads=2, d_ff=32)
    return TransformerConfig(vocab_size=task.vocab_size, num_layers=m.num_layers, d_model=m.d_model,
                             num_heads=m.num_heads, d_ff=m.d_ff, max_len=task.sequence_length,
                             dtype=jnp.dtype(m.dtype))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16, help="eval prompts (default 16)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="response_logprobs' chunk_size")
    parser.add_argument("--smoke", action="store_true", help="2 prompts, a 1-layer model, one timed call")
    args = parser.parse_args(argv)
    num_prompts = 2 if args.smoke else args.prompts
    warmup, timed = (0, 1) if args.smoke else (1, 5)

    task = get_task(DEFAULT_TASK)
    model = evaluation_model(task, args.smoke)
    params = init_params(model, jax.random.key(0))
    prompts = task.prompts("eval", num_prompts, 0)
    tokens, mask = jnp.asarray(prompts.tokens), jnp.asarray(prompts.mask)
    space = exact.enumerate_responses(task.vocab_size, task.max_response_length, task.eos_id)

    def call():
        return jax.block_until_ready(
            exact.response_logprobs(model, params, tokens, mask, space, chunk_size=args.chunk_size))

    start = time.perf_counter()
    with CompileLog() as log:
        logprobs = call()
    first_call_s = time.perf_counter() - start
    with CompileLog() as steady:
        seconds, times, cpu_seconds = median_time(call, warmup, timed)
    responses = num_prompts * space.size
    print(json.dumps({
        "benchmark": "exact_eval", "task": task.name, "prompts": num_prompts, "responses_per_prompt": space.size,
        "model": {"num_layers": model.num_layers, "d_model": model.d_model, "num_heads": model.num_heads,
                  "d_ff": model.d_ff},
        "chunk_size": args.chunk_size, "responses_per_s": responses / seconds, "eval_s": seconds,
        "call_times_s": times, "call_s": seconds, "cpu_s": cpu_seconds, "compile_s": log.seconds,
        "first_call_s": first_call_s, "recompiles": steady.compiles,
        "probability_sum_error": float(np.max(np.abs(np.exp(np.asarray(logprobs, np.float64)).sum(-1) - 1.0))),
        "peak_rss_mb": peak_rss_mb(), **machine(),
    }))


if __name__ == "__main__":
    main(sys.argv[1:])
