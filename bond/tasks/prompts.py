"""Prompt sets of the built-in tasks as TFDS datasets (array_record, no TensorFlow).

One builder, :class:`TaskPrompts`, with one BuilderConfig per task (``TASK_NAMES``). Each
config stores the splits 'train' and 'eval' with features

    'prompt'      int32 [P]   left-padded with 0
    'prompt_mask' int32 [P]   1 = real token

and the rows are exactly ``task.prompts(split, num_examples, seed)`` in that order
(shuffling is disabled, so row i of the data source is prompt i). The files are written once
per data_dir; later calls read them back (tensorflow-datasets 4.9 reads array_record files
without TensorFlow; ``as_data_source`` gives random access and feeds grain).

Training reads a split as an endless stream: step t trains on rows (t·B + i) mod N, i < B
(`batch_rows`), so a run resumed at step t reads exactly the prompts it would have:

    source = load_prompts("toy_language", "train", data_dir)
    prompts = read_prompt_rows(source, batch_rows(step, 64, len(source)))
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Sequence

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


def batch_rows(step: int, batch_size: int, num_prompts: int) -> np.ndarray:
    """The rows of step `step`'s batch in a stream of `num_prompts` prompts: (step·B + i) mod n, i < B.

    The one definition of which prompts a step trains on; a resumed run reads the same rows."""
    check_count(step, "step")
    return (int(step) * int(batch_size) + np.arange(batch_size)) % num_prompts


def read_prompt_rows(source: Sequence[dict[str, np.ndarray]], rows: Sequence[int]) -> Prompts:
    """The prompts at `rows` of a random-access prompt data source."""
    rows = [int(r) for r in rows]
    examples = source.__getitems__(rows) if hasattr(source, "__getitems__") else [source[i] for i in rows]
    tokens = np.stack([example["prompt"] for example in examples]).astype(np.int32)
    mask = np.stack([example["prompt_mask"] for example in examples]).astype(np.int32)
    return Prompts(tokens, mask)
