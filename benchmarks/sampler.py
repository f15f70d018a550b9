"""Sampler throughput on the shared workload (bon_gpt2_tiny_v1): new tokens per second.

GPT-2-shaped model (4 layers, d 256, 4 heads, vocab 512, float32, random weights), the 16 x 16
prompts of `make_prompts()`, N = 4 samples per prompt, exactly 32 new tokens (EOS masked at every
step), temperature 1. Timing: 1 warm-up call, then the median of 5 timed calls, each ended by
`block_until_ready`.

    python benchmarks/sampler.py              # bond's sampler only
    python benchmarks/sampler.py --compare    # also HF transformers GPT2LMHeadModel.generate
                                              # (needs the 'bench' extra: torch + transformers)

Prints one JSON line: workload, tokens_per_s, compile_s (and hf_tokens_per_s, ratio with --compare).
call_s / cpu_s are the median wall and process-CPU seconds of one call: on a shared machine
cpu_s / call_s is the number of cores the call actually got (2 at best here), so runs made under
load (see load_average_1m) are told apart from slow code. `--smoke` runs a tiny config (checks that the
script runs; its numbers mean nothing). `--op-profile K` also prints to stderr the
K most expensive XLA ops of one call (25th-percentile duration of each op over 3 profiled calls,
times its count per call: robust to the preemptions of a shared machine).
The workload file is found at <checkout>/../shared/bench/workload.py unless --workload is given.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import itertools
import json
import tempfile
import time
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bond.models import config_from_gpt2, init_params
from bond.sampling import sample

from common import DEFAULT_WORKLOAD, load_workload, machine, median_time, workload_and_prompts


def op_profile(call, calls: int = 3) -> list[tuple[str, float, float]]:
    """(XLA op name, seconds per call, count per call) of every op run by `call`, most expensive first.

    Seconds per call = 25th-percentile duration of the op over `calls` profiled calls times its
    count per call: a low percentile discards the calls in which the thread was preempted.
    """
    call()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(calls):
                call()
        (trace_file,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(trace_file) as f:
            events = json.load(f)["traceEvents"]
    durations = collections.defaultdict(list)
    for event in events:
        if event.get("ph") == "X" and "hlo_op" in event.get("args", {}) and not event["name"].startswith("end:"):
            durations[event["name"]].append(event["dur"] * 1e-6)
    rows = []
    for name, values in durations.items():
        values.sort()
        count = len(values) / calls
        rows.append((name, values[len(values) // 4] * count, count))
    return sorted(rows, key=lambda row: -row[1])


def time_bond(workload: dict, prompts: np.ndarray, profile_ops: int = 0) -> dict:
    """Compile time and median throughput of bond.sampling.sample on the workload.

    With profile_ops > 0, also prints the `profile_ops` most expensive XLA ops of a call to stderr.
    """
    if workload["dtype"] != "float32":
        raise SystemExit(f"this benchmark runs float32 only, workload asks for {workload['dtype']}")
    sampling, timing = workload["sampling"], workload["timing"]
    config = config_from_gpt2(workload["model"])
    params = init_params(config, jax.random.key(0))
    prompts = jnp.asarray(prompts, jnp.int32)
    prompt_mask = jnp.ones_like(prompts)
    options = dict(
        num_samples=sampling["n_per_prompt"],
        max_new_tokens=sampling["max_new_tokens"],
        min_new_tokens=sampling["min_new_tokens"],
        temperature=sampling["temperature"],
        top_k=sampling["top_k"],
        top_p=sampling["top_p"],
        eos_id=workload["model"]["eos_token_id"],
    )
    keys = itertools.cycle(
        jax.random.split(jax.random.key(1), 1 + timing["generate_warmup_calls"] + timing["generate_timed_calls"])
    )

    start = time.perf_counter()
    out = sample(config, params, prompts, prompt_mask, next(keys), **options)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - start
    new_tokens = int(out.lengths.sum())
    expected = prompts.shape[0] * sampling["n_per_prompt"] * sampling["max_new_tokens"]
    if new_tokens != expected:
        raise SystemExit(f"sampler produced {new_tokens} new tokens, the workload asks for {expected}")

    def call():
        jax.block_until_ready(sample(config, params, prompts, prompt_mask, next(keys), **options))

    seconds, times, cpu_seconds = median_time(call, timing["generate_warmup_calls"], timing["generate_timed_calls"])
    if profile_ops > 0:
        for name, op_seconds, count in op_profile(call)[:profile_ops]:
            print(f"{op_seconds * 1e3:9.2f} ms/call {count:5.0f}x  {name}", file=sys.stderr)
    return {"tokens_per_s": new_tokens / seconds, "compile_s": compile_s, "call_s": seconds,
            "call_times_s": times, "cpu_s": cpu_seconds}


def hf_model(workload: dict):
    """HF transformers GPT2LMHeadModel with the workload's config, initialised from torch seed init_seed_torch."""
    import torch
    import transformers

    model_spec = workload["model"]
    torch.manual_seed(model_spec["init_seed_torch"])
    hf_config = transformers.GPT2Config(
        vocab_size=model_spec["vocab_size"],
        n_positions=model_spec["n_positions"],
        n_embd=model_spec["n_embd"],
        n_layer=model_spec["n_layer"],
        n_head=model_spec["n_head"],
        n_inner=model_spec["n_inner"],
        activation_function=model_spec["activation_function"],
        layer_norm_epsilon=model_spec["layer_norm_epsilon"],
        resid_pdrop=model_spec["dropout"],
        embd_pdrop=model_spec["dropout"],
        attn_pdrop=model_spec["dropout"],
        bos_token_id=model_spec["bos_token_id"],
        eos_token_id=model_spec["eos_token_id"],
        pad_token_id=model_spec["pad_token_id"],
        tie_word_embeddings=model_spec["tie_word_embeddings"],
    )
    model = transformers.GPT2LMHeadModel(hf_config)
    n_params = sum(p.numel() for p in model.parameters())
    if "n_params" in model_spec and n_params != model_spec["n_params"]:
        raise SystemExit(f"HF model has {n_params} parameters, the workload says {model_spec['n_params']}")
    return model


def time_hf(workload: dict, prompts: np.ndarray, torch_threads: int | None = None) -> dict:
    """Median throughput of HF GPT2LMHeadModel.generate on the workload.

    torch uses the workload's cpu_threads unless `torch_threads` is given.
    """
    import torch
    import transformers

    sampling, timing = workload["sampling"], workload["timing"]
    torch_threads = torch_threads or timing["cpu_threads"]
    torch.set_num_threads(torch_threads)
    model_spec = workload["model"]
    model = hf_model(workload).eval()
    n = sampling["n_per_prompt"]
    input_ids = torch.as_tensor(np.repeat(prompts, n, axis=0))
    attention_mask = torch.ones_like(input_ids)

    def call():
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=True,
                temperature=sampling["temperature"],
                top_k=sampling["top_k"],
                top_p=sampling["top_p"],
                max_new_tokens=sampling["max_new_tokens"],
                min_new_tokens=sampling["min_new_tokens"],
                eos_token_id=model_spec["eos_token_id"],
                pad_token_id=model_spec["pad_token_id"],
                use_cache=sampling["use_cache"],
            )
        if out.shape != (input_ids.shape[0], input_ids.shape[1] + sampling["max_new_tokens"]):
            raise SystemExit(f"HF generate returned shape {tuple(out.shape)}")

    seconds, times, cpu_seconds = median_time(call, timing["generate_warmup_calls"], timing["generate_timed_calls"])
    new_tokens = input_ids.shape[0] * sampling["max_new_tokens"]
    return {"hf_tokens_per_s": new_tokens / seconds, "hf_call_s": seconds, "hf_call_times_s": times,
            "hf_cpu_s": cpu_seconds,
            "torch_threads": torch_threads, "torch": torch.__version__, "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD, help="path to shared/bench/workload.py")
    parser.add_argument("--compare", action="store_true", help="also time HF transformers generate")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads for --compare (default: the workload's cpu_threads)")
    parser.add_argument("--op-profile", type=int, default=0, metavar="K",
                        help="also print the K most expensive XLA ops of one sampler call to stderr")
    parser.add_argument("--smoke", action="store_true", help="a tiny config that only checks the script runs")
    args = parser.parse_args(argv)

    workload, prompts = workload_and_prompts(load_workload(args.workload), args.smoke)
    result = {"workload": workload["name"], **machine()}
    result.update(time_bond(workload, prompts, args.op_profile))
    if args.compare:
        try:
            hf = time_hf(workload, prompts, args.torch_threads)
        except ImportError as error:
            raise SystemExit(f"--compare needs torch and transformers (pip install -e '.[bench]'): {error}")
        result.update(hf)
        result["ratio"] = result["tokens_per_s"] / hf["hf_tokens_per_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
