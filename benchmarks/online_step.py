"""One online step per algorithm on the shared workload (bon_gpt2_tiny_v1): seconds per step and its phases.

The step is bond's own (the run context's compiled step, what `bond.train.run` calls every step) on a
Setup built for the workload: the GPT-2-shaped model (4 layers, d 256, vocab 512, float32, random
weights; the reference is the initial policy), the 16 x 16 prompts of `make_prompts()`, 4 policy
samples per prompt (plus each algorithm's other planned samples), exactly 32 new tokens (EOS masked
at every step), temperature 1, the even-token reward (fraction of even ids among the 32 response
ids), Adam(lr 1e-5) = AdamW without weight decay, global-norm clipping at 1.0.

    python benchmarks/online_step.py                       # rloo (registered as 'reinforce', KL β 0.05), j_bond, wind
    python benchmarks/online_step.py --algorithms=rloo     # a subset
    python benchmarks/online_step.py --compare             # also TRL's RLOOTrainer and HF generate
                                                           # (the 'bench' extra: torch, transformers, trl)
    python benchmarks/online_step.py --smoke               # a tiny config: checks that the script runs

Prints one JSON line per algorithm (keys in benchmarks/README.md); with --compare, one more line for
the sampler against HF generate, and the rloo line carries TRL's seconds per step and the ratio.
Timing: the first call compiles; then 2 warm-up steps and the median of 5 timed steps, each ended by
block_until_ready. Phases are the step's own phase functions (bond/step.py), each jitted on its own and
timed on the same inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bond import algorithms, sharding
from bond.algorithms import Drawn, LossInputs, Samples
from bond.config_base import base_config
from bond.context import Setup, anchor_kind, assemble
from bond.models import TransformerConfig, config_from_gpt2, init_params
from bond.step import (
    TrainState, anchor_update, compute_params, fixed_logprobs, loss_and_grad, make_optimizer, micro_batch_count,
    optimizer_update, pair_judge_of,
    sample_responses, score,
)
from bond.tasks import Prompts, Task, programmatic_reward

from common import (
    DEFAULT_WORKLOAD,
    CompileLog,
    load_workload,
    machine,
    matmul_peak_gflops,
    median_time,
    peak_rss_mb,
    workload_and_prompts,
)

# Benchmark name -> registered algorithm. RLOO is bond's 'reinforce' (leave-one-out baseline, KL in the return).
ALGORITHMS = {"rloo": "reinforce", "j_bond": "j_bond", "wind": "wind"}


# ---------------------------------------------------------------------------------------------
# The workload as a bond Task, config and Setup


def even_token_reward(prompt_length: int):
    """r(x, y) = fraction of even ids among the counted response tokens (the workload's reward)."""

    def reward(tokens: jax.Array, response_mask: jax.Array) -> jax.Array:
        response = jnp.asarray(tokens)[..., prompt_length:]
        counted = jnp.asarray(response_mask, jnp.float32)[..., prompt_length:]
        even = (response % 2 == 0).astype(jnp.float32)
        return jnp.sum(even * counted, axis=-1) / jnp.maximum(jnp.sum(counted, axis=-1), 1.0)

    return reward


def workload_task(workload: dict, prompts: np.ndarray) -> Task:
    """The workload as a Task: its prompts (every split) and its lengths."""
    p, s = workload["prompts"], workload["sampling"]
    tokens = np.asarray(prompts, np.int32)

    def task_prompts(split: str, num: int, seed: int) -> Prompts:
        rows = tokens[np.arange(num) % len(tokens)]
        return Prompts(rows, np.ones_like(rows))

    return Task(
        name=workload["name"],
        vocab_size=workload["model"]["vocab_size"],
        prompt_length=p["length"],
        max_response_length=s["max_new_tokens"],
        prompts=task_prompts,
        eos_id=workload["model"]["eos_token_id"],
    )


def workload_config(workload: dict, algorithm: str) -> ml_collections.ConfigDict:
    """bond's base config with the workload's step: batch, samples per prompt, β, optimizer, clipping."""
    c = base_config()
    c.algorithm = algorithm
    c.batch_size = workload["update"]["prompts_per_step"]
    c.learning_rate = 1e-5
    c.grad_clip = workload["update"]["max_grad_norm"]
    c.temperature = workload["sampling"]["temperature"]
    c.top_k = workload["sampling"]["top_k"]
    c.top_p = workload["sampling"]["top_p"]
    c.min_new_tokens = workload["sampling"]["min_new_tokens"]
    # Exactly max_new_tokens per response (EOS masked) biases the score-function gradients of
    # reinforce / j_bond / wind; the benchmark times the step, so it accepts that.
    c.allow_biased_samples = True
    c.algo.num_samples = workload["sampling"]["n_per_prompt"]
    c.algo.kl_coef = workload["update"]["kl_beta"]
    c.num_devices = 1
    c.mesh_shape = (1, 1, 1)
    return c


def workload_setup(workload: dict, prompts: np.ndarray, algorithm: str) -> Setup:
    """A bond Setup for the workload on one device (what make_setup builds for a built-in task),
    whose train prompts are the workload's (step t's batch is all of them, in order) and whose
    reward is the even-token reward."""
    config = workload_config(workload, algorithm)
    task = workload_task(workload, prompts)
    algo = algorithms.get_algorithm(algorithm)
    tokens = np.asarray(prompts, np.int32)
    reward_fn = programmatic_reward(even_token_reward(task.prompt_length))
    return Setup(
        config=ml_collections.FrozenConfigDict(config),
        task=task,
        model=config_from_gpt2(workload["model"]),
        algorithm=algo,
        plan=algo.plan(config.algo),
        anchor_kind=anchor_kind(config, algo),
        reward_fn=reward_fn,
        eval_reward_fn=reward_fn,
        mesh=sharding.make_mesh(config.mesh_shape, devices=jax.devices()[:1]),
        train_prompts=[{"prompt": row, "prompt_mask": np.ones_like(row)} for row in tokens],
    )


# ---------------------------------------------------------------------------------------------
# FLOPs


def matmul_params(model: TransformerConfig) -> int:
    """Parameters that take part in a matmul per token: the blocks' weight matrices and the output
    projection (V·d, the tied embedding); biases, LayerNorms and position embeddings excluded."""
    d = model.d_model
    return model.num_layers * (4 * d * d + 2 * d * model.d_ff) + model.vocab_size * d


def train_flops(model: TransformerConfig, shape: tuple[int, int, int], prompt_length: int) -> float:
    """Forward + backward FLOPs of one shared-prompt log-prob pass over rows [B, S, T] (prompt P).

    Per token 6·N + 12·L·d·C (PaLM, Chowdhery et al. 2022, App. B; N = matmul_params, C the keys
    the token attends over). The pass runs B·P prompt tokens (C = P) and B·S·(T − P − 1) response
    inputs (C = T − 1); the output projection (V·d of N) runs at the B·S·(T − P) scored positions.
    """
    batch, samples, length = shape
    prompt_tokens, response_inputs = batch * prompt_length, batch * samples * (length - prompt_length - 1)
    blocks = 6 * (matmul_params(model) - model.vocab_size * model.d_model)
    attention = 12 * model.num_layers * model.d_model
    projection = 6 * model.vocab_size * model.d_model * batch * samples * (length - prompt_length)
    return float(blocks * (prompt_tokens + response_inputs) + projection
                 + attention * (prompt_tokens * prompt_length + response_inputs * (length - 1)))


# ---------------------------------------------------------------------------------------------
# Phases, each its own jitted program


def phase_functions(setup: Setup):
    """(sample, score, logprobs, update): the train step's own phases (bond/step.py), each jitted
    on its own so that it can be timed; composed they compute what the fused step computes (each
    takes the state's master weights and computes with their `compute_params` copy, as the step does)."""
    plan, period = setup.plan, int(setup.config.anchor.period)
    optimizer = make_optimizer(setup.config)
    prompt_length, micro_batches = setup.task.prompt_length, micro_batch_count(setup)

    @jax.jit
    def sample_phase(params, anchor_params, prompts, prompt_mask, key):
        params, anchor_params = compute_params(setup, params), compute_params(setup, anchor_params)
        k_policy, k_anchor = jax.random.split(key)
        policy = sample_responses(setup, params, prompts, prompt_mask, k_policy, plan.policy) if plan.policy else None
        anchor = sample_responses(setup, anchor_params, prompts, prompt_mask, k_anchor, plan.anchor) if plan.anchor else None
        return policy, anchor

    @jax.jit
    def score_phase(judges, drawn):
        return tuple(None if out is None else score(setup, judges, out) for out in drawn)

    @jax.jit
    def logprobs_phase(ref_params, anchor_params, drawn, rewards) -> Drawn:
        logp_params = {"reference": ref_params, "anchor": compute_params(setup, anchor_params)}

        def fixed(out, r, source):
            if out is None:
                return None
            samples = Samples(out.tokens, out.attention_mask, out.response_mask, r, out.logprobs.sum(-1), None, None)
            return fixed_logprobs(setup, samples, source, logp_params, setup.algorithm.reads_of(source), prompt_length,
                                  micro_batches)

        return Drawn(fixed(drawn[0], rewards[0], "policy"), fixed(drawn[1], rewards[1], "anchor"), None)

    @jax.jit
    def update_phase(state: TrainState, drawn: Drawn, hp, key, judges):
        (loss, _), grads = loss_and_grad(setup, compute_params(setup, state.params), drawn, hp, key,
                                         pair_judge_of(setup, judges), prompt_length, state.algo_state, micro_batches)
        params, opt_state = optimizer_update(optimizer, state.params, state.opt_state, grads, hp)
        anchor = anchor_update(setup.anchor_kind, state.anchor_params, params, state.step, hp, period)
        return params, opt_state, anchor, loss

    return sample_phase, score_phase, logprobs_phase, update_phase


def loss_sequence_shapes(setup: Setup, drawn: Drawn, hp, key) -> list[tuple[int, ...]]:
    """The [B, S, T] shapes of the samples the loss runs the policy's differentiable log-prob pass
    on (traced with jax.eval_shape, nothing computed): what the update's FLOPs are counted over."""
    shapes = []

    def record(samples: Samples) -> jax.Array:
        shapes.append(tuple(samples.tokens.shape))
        return jnp.zeros(samples.tokens.shape[:2], jnp.float32)

    jax.eval_shape(lambda: setup.algorithm.loss(LossInputs(record, *drawn, hp, setup.config.algo, key)))
    return shapes


# ---------------------------------------------------------------------------------------------
# One algorithm


def time_algorithm(workload: dict, prompts: np.ndarray, name: str, peak_gflops: tuple[float, float]) -> dict:
    """The JSON line of one algorithm: the fused step, its phases, compile time, recompiles, memory, MFU."""
    timing, sampling = workload["timing"], workload["sampling"]
    warmup, timed = timing["step_warmup_steps"], timing["step_timed_steps"]
    setup = workload_setup(workload, prompts, ALGORITHMS[name])
    length = sampling["max_new_tokens"]
    batch = setup.config.batch_size
    context = assemble(setup, init_params(setup.model, jax.random.key(0)))
    state, fixed, traced, step_batch = context.state, context.fixed, context.traced, context.batch(0, logging=False)
    result = {"algorithm": name, "registered_as": ALGORITHMS[name], "workload": workload["name"],
              "prompts": batch, "samples_per_prompt": {"policy": setup.plan.policy, "anchor": setup.plan.anchor,
                                                       "reference": setup.plan.reference},
              "new_tokens_per_step": batch * (setup.plan.policy + setup.plan.anchor + setup.plan.reference) * length}

    def call():
        nonlocal state
        state, metrics = context.step(state, step_batch, fixed, traced)
        jax.block_until_ready((state, metrics))
        return metrics

    start = time.perf_counter()
    with CompileLog() as first:
        metrics = call()
    result["first_call_s"] = time.perf_counter() - start
    result["compile_s"] = first.seconds
    mean_length = float(metrics.get("policy_length", length))
    if mean_length != length:
        raise SystemExit(f"{name}: policy responses average {mean_length} tokens, the workload asks for {length}")
    with CompileLog() as steady:
        seconds, times, cpu_seconds = median_time(call, warmup, timed)
    result.update(s_per_step=seconds, prompts_per_s=batch / seconds,
                  tokens_per_s=result["new_tokens_per_step"] / seconds, step_times_s=times,
                  call_s=seconds, cpu_s=cpu_seconds, recompiles=steady.compiles)

    # Phases on the same inputs (the final state's parameters).
    sample_phase, score_phase, logprobs_phase, update_phase = phase_functions(setup)
    key = jax.random.key(1)
    drawn = sample_phase(state.params, state.anchor_params, step_batch.prompts, step_batch.prompt_mask, key)
    rewards = score_phase(fixed.judges, drawn)
    samples = logprobs_phase(fixed.reference, state.anchor_params, drawn, rewards)
    update_args = (state, samples, traced.hparams, jax.random.key(2), fixed.judges)
    jax.block_until_ready(update_phase(*update_args))
    sequences_seen = loss_sequence_shapes(setup, samples, traced.hparams, jax.random.key(2))
    calls = {
        "sample": lambda: sample_phase(state.params, state.anchor_params, step_batch.prompts, step_batch.prompt_mask, key),
        "score": lambda: score_phase(fixed.judges, drawn),
        "logprobs": lambda: logprobs_phase(fixed.reference, state.anchor_params, drawn, rewards),
        "update": lambda: update_phase(*update_args),
    }
    timings = {phase: median_time(lambda f=f: jax.block_until_ready(f()), warmup, timed)
               for phase, f in calls.items()}

    phases = {phase: t[0] for phase, t in timings.items()}
    result["phases"] = phases
    result["phases_cpu_s"] = {phase: t[2] for phase, t in timings.items()}
    result["phases_sum_s"] = sum(phases.values())
    update_sequences = sum(int(np.prod(shape[:-1])) for shape in sequences_seen)
    flops = sum(train_flops(setup.model, shape, setup.task.prompt_length) for shape in sequences_seen)
    peak_wall, peak_cpu = peak_gflops
    update_cpu_s = result["phases_cpu_s"]["update"]
    result.update(
        update_sequences=update_sequences,
        update_gflop=flops / 1e9,
        update_gflops=flops / phases["update"] / 1e9,
        matmul_peak_gflops=peak_wall,
        update_mfu=flops / phases["update"] / 1e9 / peak_wall,
        update_gflop_per_cpu_s=flops / update_cpu_s / 1e9,
        matmul_peak_gflop_per_cpu_s=peak_cpu,
        update_mfu_cpu=flops / update_cpu_s / 1e9 / peak_cpu,
        peak_rss_mb=peak_rss_mb(),
    )
    return result


# ---------------------------------------------------------------------------------------------
# --compare: TRL's RLOOTrainer and HF generate on the same workload


def time_trl(workload: dict, prompts: np.ndarray) -> dict:
    """Median seconds per optimizer step of TRL's RLOOTrainer on the workload (see the README for the match)."""
    import tempfile

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    from sampler import hf_model

    model_spec, sampling, update, timing = (workload[k] for k in ("model", "sampling", "update", "timing"))
    torch.set_num_threads(timing["cpu_threads"])
    n = sampling["n_per_prompt"]
    eos = model_spec["eos_token_id"]
    # A word-level tokenizer whose words are the token ids: prompt text "t435 t326 ..." encodes back
    # to exactly the workload's ids; id 0 is EOS/PAD.
    vocab = {"<eos>": eos, **{f"t{i}": i for i in range(model_spec["vocab_size"]) if i != eos}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>",
                                                     bos_token="<eos>")
    texts = [" ".join(f"t{int(i)}" for i in row) for row in prompts]
    if tokenizer(texts[0], add_special_tokens=False)["input_ids"] != [int(i) for i in prompts[0]]:
        raise SystemExit("the word-level tokenizer does not reproduce the workload's prompt ids")

    def even_reward(prompts, completions, completion_ids, **_):
        return [sum(1 for t in ids if int(t) % 2 == 0) / max(len(ids), 1) for ids in completion_ids]

    step_ends: list[tuple[float, float]] = []  # (wall, process CPU) clock at the end of each step

    class StepClock(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **_):
            step_ends.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **_):
            step_ends.append((time.perf_counter(), time.process_time()))

    steps = timing["step_warmup_steps"] + timing["step_timed_steps"]
    with tempfile.TemporaryDirectory() as tmp:
        # TRL builds its frozen reference by loading the policy's checkpoint again: save the policy first.
        hf_model(workload).save_pretrained(f"{tmp}/policy")
        tokenizer.save_pretrained(f"{tmp}/policy")
        args = trl.RLOOConfig(
            output_dir=f"{tmp}/out", use_cpu=True, report_to="none", save_strategy="no", logging_steps=10_000,
            disable_tqdm=True, seed=0, max_steps=steps,
            per_device_train_batch_size=update["completions_per_step"], gradient_accumulation_steps=1,
            num_generations=n, steps_per_generation=1, num_iterations=1,
            max_completion_length=sampling["max_new_tokens"],
            generation_kwargs={"min_new_tokens": sampling["min_new_tokens"]},
            temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=sampling["top_k"],
            beta=update["kl_beta"], learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=update["max_grad_norm"], optim="adamw_torch", gradient_checkpointing=False,
            bf16=False, fp16=False,  # RLOOConfig defaults to bf16 autocast; the workload is float32
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        )
        trainer = trl.RLOOTrainer(
            model=f"{tmp}/policy", reward_funcs=even_reward, args=args,
            train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer, callbacks=[StepClock()],
        )
        with contextlib.redirect_stdout(sys.stderr):  # the trainer prints its logs: stdout carries JSON lines only
            trainer.train()
    durations = np.diff(np.asarray(step_ends), axis=0)[timing["step_warmup_steps"]:]
    return {"trl_s_per_step": float(np.median(durations[:, 0])), "trl_step_times_s": durations[:, 0].tolist(),
            "trl_cpu_s": float(np.median(durations[:, 1])),
            "trl": trl.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads()}


def compare_sampler(workload: dict, prompts: np.ndarray) -> dict:
    """The sampler benchmark's bond and HF generate timings (benchmarks/sampler.py), in this process."""
    from sampler import time_bond, time_hf

    result = {"benchmark": "sampler", "workload": workload["name"], **machine()}
    result.update(time_bond(workload, prompts))
    result.update(time_hf(workload, prompts))
    result["ratio"] = result["tokens_per_s"] / result["hf_tokens_per_s"]
    return result


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", type=Path, default=DEFAULT_WORKLOAD, help="path to shared/bench/workload.py")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS),
                        help=f"comma-separated subset of {sorted(ALGORITHMS)}")
    parser.add_argument("--compare", action="store_true", help="also time TRL's RLOOTrainer and HF generate")
    parser.add_argument("--smoke", action="store_true", help="a tiny config that only checks the script runs")
    args = parser.parse_args(argv)
    names = [a for a in args.algorithms.split(",") if a]
    unknown = sorted(set(names) - set(ALGORITHMS))
    if unknown or not names:
        raise SystemExit(f"--algorithms: unknown {unknown}; choose from {sorted(ALGORITHMS)}")
    if args.compare:
        try:
            import torch, transformers, trl  # noqa: F401
        except ImportError as error:
            raise SystemExit(f"--compare needs torch, transformers and trl (pip install -e '.[bench]'): {error}")

    workload, prompts = workload_and_prompts(load_workload(args.workload), args.smoke)
    if workload["dtype"] != "float32":
        raise SystemExit(f"this benchmark runs float32 only, the workload asks for {workload['dtype']}")
    peak = matmul_peak_gflops(size=256 if args.smoke else 1024, reps=2 if args.smoke else 20)
    trl_result = time_trl(workload, prompts) if args.compare and "rloo" in names else None
    for name in names:
        result = {**time_algorithm(workload, prompts, name, peak), **machine()}
        if name == "rloo" and trl_result is not None:
            result.update(trl_result)
            result["trl_ratio"] = trl_result["trl_s_per_step"] / result["s_per_step"]
            result["trl_cpu_ratio"] = trl_result["trl_cpu_s"] / result["cpu_s"]
        print(json.dumps(result), flush=True)
    if args.compare:
        print(json.dumps(compare_sampler(workload, prompts)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
