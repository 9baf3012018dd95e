"""A ClientApp process imports only what it uses: no plotting, clustering or data-set libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what a client never uses: data preparation (clustering, flwr-datasets and its plots), Ray, plotting
NOT_FOR_A_CLIENT = ("sklearn", "flwr_datasets", "datasets", "matplotlib", "seaborn", "ray")


def test_a_client_process_does_not_import_preparation_or_plotting_libraries():
    code = (
        "import json, sys\n"
        "import client_app.app, fellrec_flwr.runtime, data_prep.prepare, fellrec_flwr.data.prepared\n"
        "import fellrec_flwr.train.trainer, fellrec_flwr.model.parts, fellrec_flwr.eval.evaluate\n"
        "import fellrec_flwr.split.runtime, fellrec_flwr.split.client\n"
        f"print(json.dumps([m for m in {NOT_FOR_A_CLIENT!r} if m in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_partitioner_classes_are_still_importable_from_partitioners():
    from data_prep import partitioners
    from data_prep.flower_partitioners import KMeansPartitioner

    assert partitioners.KMeansPartitioner is KMeansPartitioner
    assert partitioners.make_partitioner("iid", 2, 0, 0.5, 10).num_partitions == 2
