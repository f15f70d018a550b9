"""J-BOND on a Gemma-2B-class checkpoint with an HF reward model (BOND §6, arXiv 2407.14622).

The policy and the reference load from one HF checkpoint folder (config.json + safetensors +
tokenizer), the reward from an HF sequence-classification checkpoint trained with the same
tokenizer, the prompts from TFDS xsum (prepared once as array_record:
`tfds build xsum --file_format=array_record`), each wrapped in Gemma's chat template.

One host (all its accelerators in the mesh):

    python -m bond.main --config=configs/pretrained/j_bond_gemma.py --workdir=runs/j_bond_gemma \
        --config.pretrained.policy_path=/ckpt/gemma-2b-it --config.pretrained.reward_path=/ckpt/gemma-2b-rm

Two hosts x 8 accelerators: the same command on every host, started through
jax.distributed.initialize (no arguments on TPU pods and SLURM, which JAX detects; elsewhere give
the coordinator, the process count and this host's index), with the mesh (data=2 across the hosts,
fsdp=8 inside each) and a shared workdir:

    python -m bond.main --distributed --coordinator=host0:1234 --num_processes=2 --process_id=$HOST_INDEX \
        --config=configs/pretrained/j_bond_gemma.py --workdir=/shared/runs/j_bond_gemma \
        --config.mesh_shape='(2,8,1)' --config.pretrained.policy_path=/ckpt/gemma-2b-it \
        --config.pretrained.reward_path=/ckpt/gemma-2b-rm

The batch (64 prompts) must divide data x fsdp = 16. Parameters are bfloat16; Adam's moments and
the update math are float32. One policy sample and two anchor samples per prompt, β = 0.5
(Jeffreys), γ = 0, EMA anchor η = 0.02; the learning rate and lengths are starting points, not
tuned values from the paper.

The `tiny` variant runs the same code on the tiny Llama test checkpoint and its reward model
(tests/fixtures/pretrained, made by tests/make_pretrained_fixtures.py) for a smoke run on a CPU:

    python -m bond.main --config=configs/pretrained/j_bond_gemma.py:tiny --workdir=/tmp/j_bond_tiny

The `gemma_2b` (batch 64) and `gemma_7b` (batch 128, the paper's) variants have the released models'
shapes from the presets in bond/models/presets, policy and reward model alike, for compiling the run
ahead of time without any file (README "Scaling to real models"):

    python -m bond.main --config=configs/pretrained/j_bond_gemma.py:gemma_2b --dry_run --topology=v5e:2x4
"""

from pathlib import Path

from bond.config_base import apply_args, at_model_scale, base_config, lora, pretrained_smoke_run

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "pretrained"
TINY_PROMPTS = [
    "Summarize: the cat sat on the mat.",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "Explain best-of-n sampling in one sentence.",
    "List three colors.",
    "Say hello politely.",
    "Give a one-word answer: yes or no?",
    "Describe a tree.",
]


def tiny(c):
    """The test fixtures, a few steps, small lengths: a smoke run of the whole path."""
    return pretrained_smoke_run(
        c, TINY_PROMPTS, policy_path=str(FIXTURES / "llama"), reward_path=str(FIXTURES / "llama_reward"))


def lora_on_one_host(c):
    """LoRA of rank 16 on every projection (`bond.config_base.lora`), laid out for one host of 16 GiB
    chips (a v5e-8): with the base frozen there is no optimizer state to split, so every weight is
    split over the host's chips by tensor parallelism (mesh (1, 1, all)), none is ever gathered (the
    FSDP layout gathers each layer's weights at every decoded token, and XLA holds all of them at
    once: measured, benchmarks/README.md), and sampling, scoring, log-prob passes and gradient run
    over 4 micro-batches of the prompts. `gemma_7b,lora --config.batch_size=64` fits a v5e-8."""
    lora(c)
    c.mesh_shape = (1, 1, -1)
    c.memory.micro_batches = 4
    return c


def get_config(arg: str | None = None):
    c = base_config()
    c.algorithm = "j_bond"
    c.task = "pretrained"
    c.algo.num_samples = 1
    c.algo.beta = 0.5
    c.algo.gamma = 0.0
    c.anchor.kind = "ema"
    c.anchor.eta = 0.02
    c.pretrained.update(
        policy_path="", reward_path="", eos_token="<end_of_turn>", chat_template=True,
        max_prompt_length=512, max_new_tokens=64, param_dtype="bfloat16",
    )
    c.pretrained.prompts.update(
        source="tfds:xsum", field="document", train_split="train", eval_split="validation",
        template="Summarize the following article in one sentence.\n\n{text}",
    )
    c.steps = 2000
    c.batch_size = 64
    c.learning_rate = 3e-6
    c.temperature = 1.0
    c.eval.update(every=100, num_prompts=64, num_samples=4, exact=False)
    c.checkpoint.update(every=100, keep=3)
    c.log_every = 10
    c.mesh_shape = (1, -1, 2)  # FSDP over the host's devices, tensor-parallel pairs; see the docstring for two hosts
    # The smallest per-chip need measured for Gemma-2B on a v5e-8 (benchmarks/README.md, "Paper scale").
    c.memory.update(remat="nothing_saveable", logprob_vocab_chunk=32000)
    return apply_args(c, arg, variants={
        "tiny": tiny,
        "gemma_2b": lambda c: at_model_scale(c, "gemma_2b", batch_size=64, judges=("reward_path",)),
        "gemma_7b": lambda c: at_model_scale(c, "gemma_7b", batch_size=128, judges=("reward_path",)),  # the paper's batch
        "lora": lora_on_one_host,
    })
