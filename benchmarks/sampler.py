"""Sampler throughput on the shared workload (bon_gpt2_tiny_v1): new tokens per second.

GPT-2-shaped model (4 layers, d 256, 4 heads, vocab 512, float32, random weights), the 16 x 16
prompts of `make_prompts()`, N = 4 samples per prompt, exactly 32 new tokens (EOS masked at every
step), temperature 1. Timing: 1 warm-up call, then the median of 5 timed calls, each ended by
`block_until_ready`.

    python benchmarks/sampler.py              # bond's sampler only
    python benchmarks/sampler.py --compare    # also HF transformers GPT2LMHeadModel.generate
                                              # (needs the 'bench' extra: torch + transformers)

Prints one JSON line: workload, tokens_per_s, compile_s (and hf_tokens_per_s, ratio with --compare).
The workload file is found at <checkout>/../shared/bench/workload.py unless --workload is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np

from bond.models import config_from_gpt2, init_params
from bond.sampling import sample

DEFAULT_WORKLOAD = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "workload.py"


def load_workload(path: Path) -> ModuleType:
    """Import the shared workload definition from a file path."""
    if not path.is_file():
        raise SystemExit(f"workload file not found: {path}; pass --workload /path/to/workload.py")
    spec = importlib.util.spec_from_file_location("bench_workload", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def median_time(call, warmup: int, timed: int) -> tuple[float, list[float]]:
    """Median wall time of `timed` calls after `warmup` calls."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def time_bond(workload: dict, prompts: np.ndarray) -> dict:
    """Compile time and median throughput of bond.sampling.sample on the workload."""
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
    keys = iter(jax.random.split(jax.random.key(1), 1 + timing["generate_warmup_calls"] + timing["generate_timed_calls"]))

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

    seconds, times = median_time(call, timing["generate_warmup_calls"], timing["generate_timed_calls"])
    return {"tokens_per_s": new_tokens / seconds, "compile_s": compile_s, "call_s": seconds,
            "call_times_s": times}


def time_hf(workload: dict, prompts: np.ndarray, torch_threads: int | None = None) -> dict:
    """Median throughput of HF GPT2LMHeadModel.generate on the workload.

    torch uses the workload's cpu_threads unless `torch_threads` is given.
    """
    import torch
    import transformers

    model_spec, sampling, timing = workload["model"], workload["sampling"], workload["timing"]
    torch_threads = torch_threads or timing["cpu_threads"]
    torch.set_num_threads(torch_threads)
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
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != model_spec["n_params"]:
        raise SystemExit(f"HF model has {n_params} parameters, the workload says {model_spec['n_params']}")
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

    seconds, times = median_time(call, timing["generate_warmup_calls"], timing["generate_timed_calls"])
    new_tokens = input_ids.shape[0] * sampling["max_new_tokens"]
    return {"hf_tokens_per_s": new_tokens / seconds, "hf_call_s": seconds, "hf_call_times_s": times,
            "torch_threads": torch_threads, "torch": torch.__version__, "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD, help="path to shared/bench/workload.py")
    parser.add_argument("--compare", action="store_true", help="also time HF transformers generate")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads for --compare (default: the workload's cpu_threads)")
    args = parser.parse_args(argv)

    bench = load_workload(args.workload)
    workload = bench.WORKLOAD
    prompts = bench.make_prompts(workload)
    result = {"workload": workload["name"], "backend": jax.default_backend(),
              "load_average_1m": round(os.getloadavg()[0], 2), "cpu_count": os.cpu_count()}
    result.update(time_bond(workload, prompts))
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
