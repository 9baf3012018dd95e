"""Seeded K-means, shared by the item categories (`partitioners`) and the K-means partitioner
(`flower_partitioners`); apart so that neither of those two imports the other back."""

from __future__ import annotations

import numpy as np

KMEANS_N_INIT = 10


def kmeans_labels(vectors: np.ndarray, k: int, seed: int, n_init: int = KMEANS_N_INIT) -> np.ndarray:
    """Seeded K-means labels. One BLAS/OpenMP thread: on a shared 2-core machine more threads
    made it 4x slower, and a single thread is deterministic."""
    from sklearn.cluster import KMeans  # imported when used: ~100 MB a data reader does not need
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return KMeans(k, n_init=n_init, random_state=seed).fit_predict(np.asarray(vectors, dtype=np.float64))
