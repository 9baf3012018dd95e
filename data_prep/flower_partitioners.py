"""The flwr-datasets partitioner classes of `data_prep.partitioners` (kmeans, iid).

Apart because flwr-datasets (with matplotlib and seaborn), datasets and scikit-learn take ~100 MB
to import: a process that only reads prepared data (every ClientApp) never imports them.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import IidPartitioner, Partitioner

from data_prep.errors import DataPrepError
from data_prep.kmeans import KMEANS_N_INIT, kmeans_labels


def _column(dataset: Dataset, name: str) -> np.ndarray:
    """A whole column as one numpy array (``dataset[name]`` would iterate row by row)."""
    return dataset.with_format("numpy")[:][name]


class KMeansPartitioner(Partitioner):
    """Partition rows by K-means clusters of a vector column (largest cluster = partition 0)."""

    def __init__(self, num_partitions: int, partition_by: str = "embedding", seed: int = 2024,
                 n_init: int = KMEANS_N_INIT) -> None:
        super().__init__()
        if num_partitions < 1:
            raise DataPrepError(f"num_partitions={num_partitions} must be >= 1.")
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._seed = seed
        self._n_init = n_init
        self._indices: list[np.ndarray] | None = None

    def _fit(self) -> list[np.ndarray]:
        if self._indices is None:
            vectors = _column(self.dataset, self._partition_by)
            if len(vectors) < self._num_partitions:
                raise DataPrepError(f"{len(vectors)} users cannot form {self._num_partitions} clients; "
                                    "lower data.num-clients.")
            labels = kmeans_labels(vectors, self._num_partitions, self._seed, self._n_init)
            sizes = np.bincount(labels, minlength=self._num_partitions)
            order = sorted(range(self._num_partitions), key=lambda c: (-sizes[c], c))
            self._indices = [np.flatnonzero(labels == c) for c in order]
        return self._indices

    def load_partition(self, partition_id: int) -> Dataset:
        return self.dataset.select(self._fit()[partition_id])

    @property
    def num_partitions(self) -> int:
        return self._num_partitions


class ShuffledIidPartitioner(IidPartitioner):
    """IidPartitioner over a seeded shuffle of the rows (the original cuts them in file order)."""

    def __init__(self, num_partitions: int, seed: int = 2024) -> None:
        super().__init__(num_partitions)
        self._seed = seed
        self._shuffled: Dataset | None = None

    def load_partition(self, partition_id: int) -> Dataset:
        if self._shuffled is None:
            if self.dataset.num_rows < self.num_partitions:
                raise DataPrepError(f"{self.dataset.num_rows} users cannot form {self.num_partitions} clients; "
                                    "lower data.num-clients.")
            self._shuffled = self.dataset.shuffle(seed=self._seed)
        return self._shuffled.shard(num_shards=self.num_partitions, index=partition_id, contiguous=True)
