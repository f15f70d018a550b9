"""Prompt sets of the built-in tasks as TFDS datasets (array_record, no TensorFlow).

One builder, :class:`TaskPrompts`, with one BuilderConfig per task (``TASK_NAMES``). Each
config stores the splits 'train' and 'eval' with features

    'prompt'      int32 [P]   left-padded with 0
    'prompt_mask' int32 [P]   1 = real token

and the rows are exactly ``task.prompts(split, num_examples, seed)`` in that order
(shuffling is disabled, so row i of the data source is prompt i). The files are written once
per data_dir; later calls read them back (tensorflow-datasets 4.9 reads array_record files
without TensorFlow; ``as_data_source`` gives random access and feeds grain).

Training reads a split as an endless stream: stream position s is row s mod N, so a run that
saved its position resumes exactly where it stopped:

    source = load_prompts("toy_language", "train", data_dir)
    for batch in prompt_batches(source, start_index=saved_position, batch_size=64):
        ...; saved_position = batch.next_position
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from bond.tasks import SPLITS, TASK_NAMES, Prompts, check_count, check_split, get_task


@dataclasses.dataclass(eq=False)
class TaskPromptsConfig(tfds.core.BuilderConfig):
    """Which task, how many prompts per split, and the seed passed to ``task.prompts``."""

    num_train: int = 0
    num_eval: int = 0
    seed: int = 0


class TaskPrompts(tfds.core.GeneratorBasedBuilder):
    """Prompt sets of the built-in tasks: config name = task name."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        TaskPromptsConfig(
            name="toy_language",
            description="Toy language: 4096 train prompts (pool of 56), each of the 16 eval prompts once.",
            num_train=4096,
            num_eval=16,
        ),
        TaskPromptsConfig(
            name="synthetic_language",
            description="Synthetic language: 16384 train and 512 eval prompt walks.",
            num_train=16384,
            num_eval=512,
        ),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds 4.9.10 resolves the source path of a builder that lives in a package through
        # the importlib_resources backport, which it only requires on Python < 3.9; the
        # source file itself is the same answer and needs no extra dependency.
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        length = get_task(self.builder_config.name).prompt_length
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict(
                {
                    "prompt": tfds.features.Tensor(shape=(length,), dtype=np.int32),
                    "prompt_mask": tfds.features.Tensor(shape=(length,), dtype=np.int32),
                }
            ),
            disable_shuffling=True,  # row i is prompt i of task.prompts(split, num, seed)
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # generated, nothing to download
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split: str):
        config = self.builder_config
        num = {"train": config.num_train, "eval": config.num_eval}[split]
        batch = get_task(config.name).prompts(split, num, config.seed)
        for index in range(num):
            yield index, {"prompt": batch.tokens[index], "prompt_mask": batch.mask[index]}


def prompt_builder(task: str, data_dir: str | os.PathLike) -> TaskPrompts:
    """The TFDS builder of `task`'s prompt sets under `data_dir` (array_record files)."""
    if task not in TASK_NAMES:
        raise ValueError(f"task={task!r} has no prompt dataset; use one of {TASK_NAMES}.")
    return TaskPrompts(config=task, data_dir=os.fspath(data_dir), file_format="array_record")


def load_prompts(task: str, split: str, data_dir: str | os.PathLike) -> Sequence[dict[str, np.ndarray]]:
    """Random-access data source of a split; builds the dataset on the first call only."""
    check_split(split)
    builder = prompt_builder(task, data_dir)
    builder.download_and_prepare()  # a no-op when the files already exist
    return builder.as_data_source(split=split)


class PromptBatch(NamedTuple):
    """A batch read from a prompt stream; `next_position` is where the stream resumes."""

    tokens: np.ndarray  # [B, P] int32
    mask: np.ndarray  # [B, P] int32
    next_position: int


def _check_stream_args(source: Sequence[dict[str, np.ndarray]], start_index: int, batch_size: int) -> None:
    check_count(start_index, "start_index")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
    if len(source) == 0:
        raise ValueError("the prompt data source is empty; rebuild it with load_prompts.")


def read_prompt_batch(source: Sequence[dict[str, np.ndarray]], start_index: int, batch_size: int) -> Prompts:
    """Rows (start_index + i) mod len(source), i < batch_size, of a prompt data source."""
    _check_stream_args(source, start_index, batch_size)
    rows = [(int(start_index) + i) % len(source) for i in range(batch_size)]
    examples = source.__getitems__(rows) if hasattr(source, "__getitems__") else [source[i] for i in rows]
    tokens = np.stack([example["prompt"] for example in examples]).astype(np.int32)
    mask = np.stack([example["prompt_mask"] for example in examples]).astype(np.int32)
    return Prompts(tokens, mask)


def prompt_batches(
    source: Sequence[dict[str, np.ndarray]], start_index: int, batch_size: int
) -> Iterator[PromptBatch]:
    """Endless batches of the stream from `start_index`: batch k holds positions start + kB .. + B − 1."""
    _check_stream_args(source, start_index, batch_size)

    def stream() -> Iterator[PromptBatch]:
        position = int(start_index)
        while True:
            batch = read_prompt_batch(source, position, batch_size)
            position += batch_size
            yield PromptBatch(batch.tokens, batch.mask, position)

    return stream()
