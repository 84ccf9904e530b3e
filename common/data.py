"""The image data every model step reads: split manifests resolved to files, and the tf.data pipeline over them.

train, evaluate, audit_labels and the training benchmarks load images through these, so each sees the
same files, in the same order, decoded to the same pixels (common.images) as the exported model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from common.images import decode_and_resize

AUTOTUNE = tf.data.AUTOTUNE


@dataclass(frozen=True)
class Split:
    """One split manifest resolved to absolute image paths and integer labels."""

    paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def read_split(csv_path: Path, images_root: Path, class_names: list[str]) -> Split:
    """Read a split CSV (path, class_name, label, sha256); path is relative to `images_root`."""
    frame = pd.read_csv(csv_path, dtype={"path": "string", "class_name": "string"})
    label_of = {name: index for index, name in enumerate(class_names)}
    unknown = sorted(set(frame["class_name"]) - set(label_of))
    if unknown:
        raise ValueError(f"{csv_path}: classes {unknown} are not in class_names.json")
    labels = frame["class_name"].map(label_of).to_numpy(dtype=np.int64)
    return Split([str(images_root / p) for p in frame["path"]], labels)


def unlabelled(paths: list[str]) -> Split:
    """A split of images whose labels do not matter (features or predictions only)."""
    return Split(paths, np.zeros(len(paths), np.int64))


def image_dataset(split: Split, image_size: int) -> tf.data.Dataset:
    """(pixels 0..255 float32 [size, size, 3], label), decoded once and cached in memory, in manifest order."""

    def load(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return decode_and_resize(tf.io.read_file(path), image_size), label

    dataset = tf.data.Dataset.from_tensor_slices((split.paths, split.labels))
    return dataset.map(load, num_parallel_calls=AUTOTUNE, deterministic=True).cache()


def batches(dataset: tf.data.Dataset, batch_size: int, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Shuffle (seeded, reshuffled each epoch) when a seed is given, then batch and prefetch."""
    if shuffle_seed is not None:
        size = int(dataset.cardinality())
        dataset = dataset.shuffle(max(size, 1), seed=shuffle_seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(AUTOTUNE)
