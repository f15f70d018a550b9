"""bond: aligning language models by best-of-N distillation (BOND, J-BOND, iterative BOND, WIND)."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
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
    "torch==2.13.0",
    "transformers",
    "trl",
]

setup(
    name="bond",
    version="0.1.0",
    description="Best-of-N distillation for aligning language models, in JAX.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["bond", "bond.*"]),
    install_requires=RUNTIME,
    extras_require={"test": TEST, "bench": BENCH},
)
