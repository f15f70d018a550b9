"""WIND on a Llama-class checkpoint with a pairwise preference model (Yang et al. 2024, arXiv 2410.20727).

The policy and the reference load from one HF checkpoint folder; WIND learns from a pair scorer
(the PairRM slot of bond/models/preference.py): a sequence-classification checkpoint with the
policy's tokenizer reads prompt ⊕ y ⊕ separator ⊕ y' and scores that the first response is
better, averaged over both orders, P(y ≻ y') = ½[σ(s(x, y, y')) + 1 − σ(s(x, y', y))]. An
optional reward model (reward_path) gives the reward metrics; evaluation reports the pair
scorer's win rate against the reference either way. Prompts: a JSONL file per split with a
'prompt' field (e.g. UltraFeedback's instructions), in Llama-3's chat template.

One host:

    python -m bond.main --config=configs/pretrained/wind_llama.py --workdir=runs/wind_llama \
        --config.pretrained.policy_path=/ckpt/Meta-Llama-3-8B-Instruct \
        --config.pretrained.preference_path=/ckpt/llama3-8b-pair-scorer \
        --config.pretrained.prompts.source='jsonl:/data/ultrafeedback_{split}.jsonl'

Two hosts x 8 accelerators: the same command on every host, started through
jax.distributed.initialize (no arguments on TPU pods and SLURM; elsewhere the coordinator, the
process count and this host's index), data=2 across hosts and fsdp=8 inside each:

    python -m bond.main --distributed --coordinator=host0:1234 --num_processes=2 --process_id=$HOST_INDEX \
        --config=configs/pretrained/wind_llama.py --workdir=/shared/runs/wind_llama --config.mesh_shape='(2,8,1)' \
        --config.pretrained.policy_path=/ckpt/Meta-Llama-3-8B-Instruct \
        --config.pretrained.preference_path=/ckpt/llama3-8b-pair-scorer \
        --config.pretrained.prompts.source='jsonl:/data/ultrafeedback_{split}.jsonl'

Four samples per prompt of π_t (S² = 16 ordered pairs per prompt for the judge), the square loss,
η = 1, β = 0.1, π_t a hard anchor moved to the policy every 50 steps (one WIND iteration); bfloat16
parameters with float32 Adam moments. Learning rate and lengths are starting points, not tuned values.

The `tiny` variant: the tiny Llama test checkpoint, its reward model as both the reward and the
pair scorer (tests/fixtures/pretrained), a few steps on a CPU:

    python -m bond.main --config=configs/pretrained/wind_llama.py:tiny --workdir=/tmp/wind_tiny

The `llama3_8b` variant has Llama-3-8B's shapes (bond/models/presets), for the policy and the pair
scorer, for compiling the run ahead of time without any file:

    python -m bond.main --config=configs/pretrained/wind_llama.py:llama3_8b --dry_run --topology=v5p:2x2x1
"""

from pathlib import Path

from bond.config_base import apply_args, at_model_scale, base_config, pretrained_smoke_run

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "pretrained"
TINY_PROMPTS = [
    "Write a haiku about rain.",
    "What is two plus two?",
    "Name a fruit.",
    "Give me a tip for sleeping well.",
    "Translate 'hello' into French.",
    "Why is the sky blue?",
    "Suggest a name for a cat.",
    "Finish the sentence: once upon a time",
]


def tiny(c):
    """The test fixtures, a few steps, small lengths: a smoke run of the whole path."""
    pretrained_smoke_run(
        c, TINY_PROMPTS, policy_path=str(FIXTURES / "llama"), reward_path=str(FIXTURES / "llama_reward"),
        preference_path=str(FIXTURES / "llama_reward"), preference_separator="",
    )
    c.algo.num_samples = 2
    return c


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "wind"
    c.task = "pretrained"
    c.algo.num_samples = 4
    c.algo.wind_variant = "square"
    c.algo.wind_eta = 1.0
    c.algo.wind_beta = 0.1
    c.anchor.update(kind="hard", period=50)  # π_t held for an iteration of 50 steps, then π_t ← π_θ
    c.pretrained.update(
        policy_path="", reward_path="", preference_path="", eos_token="<|eot_id|>", chat_template=True,
        preference_separator="\n\n[Response B]\n", max_prompt_length=512, max_new_tokens=256, param_dtype="bfloat16",
    )
    c.pretrained.prompts.update(
        source="jsonl:/data/ultrafeedback_{split}.jsonl", field="prompt", train_split="train", eval_split="test",
    )
    c.steps = 1000
    c.batch_size = 32
    c.learning_rate = 5e-7
    c.eval.update(every=100, num_prompts=64, num_samples=4, exact=False)
    c.checkpoint.update(every=100, keep=3)
    c.log_every = 10
    c.mesh_shape = (1, -1, 1)
    # Each block rematerialized, log-probs over vocabulary chunks (a quarter of Llama-3's 128,256):
    # without them the Llama-3-8B step needs 127 GiB of temporaries per v5p chip (benchmarks/README.md).
    c.memory.update(remat="nothing_saveable", logprob_vocab_chunk=32064)
    return apply_args(c, arg, variants={
        "tiny": tiny,
        "llama3_8b": lambda c: at_model_scale(c, "llama3_8b", batch_size=c.batch_size, judges=("preference_path",)),
    })
