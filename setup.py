"""bond: aligning language models by best-of-N distillation (BOND, J-BOND, iterative BOND, WIND)."""

from setuptools import find_packages, setup

# Lower bounds: the oldest releases the tests ran on (jax/jaxlib 0.10.2, flax 0.12, optax 0.2.8,
# orbax-checkpoint 0.12). Upper bounds exclude only releases that do not exist yet: each minor
# release of jax removes APIs the one before deprecated (and flax/orbax follow jax), so the next one
# is let in once the tests pass on it. Released and allowed today: jax/jaxlib 0.12, flax 0.12.12,
# orbax-checkpoint 0.12.8.
RUNTIME = [
    "jax>=0.10.2,<0.13",
    "jaxlib>=0.10.2,<0.13",
    "flax>=0.12,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "tensorflow-datasets>=4.9,<5",
    "array_record>=0.8",
    "ml-collections>=1.0",
    "chex>=0.1.90",
    "numpy>=2.0",
    "matplotlib>=3.8",
    "tensorboardX>=2.6",
    "absl-py>=2.0",
    # real checkpoints and text: bfloat16 tensors, tokenizers, chat templates, parquet prompt files
    "ml_dtypes>=0.5",
    "protobuf>=4.21",
    "tokenizers>=0.20",
    "sentencepiece>=0.2",
    "jinja2>=3.1",
    "pyarrow>=14",
]

TEST = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "hypothesis>=6.100",
    "scipy>=1.12",
    # the notebooks run in the tests
    "nbformat>=5.9",
    "nbclient>=0.10",
    "ipykernel>=6.29",
]

# Optional: the comparison runs of the benchmarks (HF generate, TRL) on CPU.
BENCH = [
    "torch==2.13.0",  # exactly: benchmarks/README.md's comparisons were measured with torch 2.13.0+cpu
    "transformers",
    "trl",
]

# Optional: metrics to Weights & Biases as well (config.wandb). 0.19.10 brought reinit="create_new",
# which keeps a population's member runs open side by side.
WANDB = ["wandb>=0.19.10"]

# Optional: TPU hosts. A libtpu build serves exactly one jax/jaxlib release, so the extra pins all
# three together, as jax 0.10.2's own `jax[tpu]` extra does (its METADATA: libtpu==0.0.42.*); a
# `jax[tpu]` within RUNTIME's range could pair a newer jax with the libtpu of another. To move a TPU
# install to a newer jax, change the three pins together from that jax wheel's METADATA.
TPU = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "libtpu==0.0.42.*",
    "requests",  # jax[tpu] needs it to read the TPU VM's metadata
]

setup(
    name="bond",
    version="0.1.0",
    description="Best-of-N distillation for aligning language models, in JAX.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["bond", "bond.*"]),
    package_data={"bond.models": ["presets/*.json"]},  # the dry run's model shapes (preset:gemma_2b, ...)
    install_requires=RUNTIME,
    extras_require={"test": TEST, "bench": BENCH, "wandb": WANDB, "tpu": TPU},
)
