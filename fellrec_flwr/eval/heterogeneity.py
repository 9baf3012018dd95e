"""How different the clients of a prepared folder are: per client, its users, its training
windows and the Jensen-Shannon divergence of its item distribution from the whole.

    python -m fellrec_flwr.eval.heterogeneity PREPARED_DIR [--out DIR] [--seed N]

writes heterogeneity.csv (one row per client), heterogeneity.json (the rows and a summary)
and heterogeneity.png under --out.

Items are counted by title group (item ids sharing one title are one item, as grounding and
evaluation count them) over the training interactions (each user's training sequence, without
the validation and test targets). JS uses log base 2, so it lies in [0, 1]: 0 = the client
interacts with the catalogue exactly as everyone does, 1 = no item in common.

A finite sample of a 17k-title catalogue diverges from the whole even when drawn at random,
and more so the smaller the client. So every client is also compared with an iid client of
the same size: the same users shuffled (seeded) and cut into groups of the clients' sizes.
The partition is heterogeneous by as much as its JS exceeds that reference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

CSV_NAME, JSON_NAME, PNG_NAME = "heterogeneity.csv", "heterogeneity.json", "heterogeneity.png"


class HeterogeneityInputError(ValueError):
    """Counts that are empty, negative or of mismatched shapes."""


# --------------------------------------------------------------------------- the math (pure)


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) of two distributions given as counts or
    probabilities over the same categories (each is normalised here)."""
    from scipy.spatial.distance import jensenshannon

    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise HeterogeneityInputError(f"js_divergence needs two 1-d arrays of one length; got {p.shape}, {q.shape}.")
    if (p < 0).any() or (q < 0).any() or p.sum() <= 0 or q.sum() <= 0:
        raise HeterogeneityInputError("js_divergence needs non-negative counts with a positive total in each.")
    # scipy gives the JS *distance*, the square root of the divergence
    return float(jensenshannon(p, q, base=2) ** 2)


def client_group_counts(client_of: np.ndarray, group_of: np.ndarray, num_clients: int, num_groups: int) -> np.ndarray:
    """(num_clients, num_groups) counts from one (client, group) pair per interaction."""
    client_of, group_of = np.asarray(client_of, dtype=np.int64), np.asarray(group_of, dtype=np.int64)
    if client_of.shape != group_of.shape:
        raise HeterogeneityInputError(f"one client and one group per interaction; got {client_of.shape} "
                                      f"and {group_of.shape}.")
    if len(client_of) and (client_of.min() < 0 or client_of.max() >= num_clients
                           or group_of.min() < 0 or group_of.max() >= num_groups):
        raise HeterogeneityInputError(f"client ids must be in 0..{num_clients - 1} and groups in 0..{num_groups - 1}.")
    flat = np.bincount(client_of * num_groups + group_of, minlength=num_clients * num_groups)
    return flat.reshape(num_clients, num_groups)


def divergence_from_whole(counts: np.ndarray) -> np.ndarray:
    """Per row of a (clients, categories) count matrix: JS of the row from the sum of all rows."""
    counts = np.asarray(counts)
    whole = counts.sum(axis=0)
    return np.array([js_divergence(row, whole) for row in counts])


def iid_assignment(sizes: list[int] | np.ndarray, seed: int) -> np.ndarray:
    """A client per user for an iid split with the given client sizes: the users (0..sum-1)
    shuffled with `seed`, then the first sizes[0] to client 0, the next sizes[1] to client 1..."""
    sizes = np.asarray(sizes, dtype=np.int64)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    out = np.empty_like(labels)
    out[np.random.default_rng(seed).permutation(len(labels))] = labels
    return out


# --------------------------------------------------------------------------- one prepared folder


def measure(data: Any, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-client rows and a summary for a ``fellrec_flwr.data.prepared.PreparedData``."""
    from fellrec_flwr.eval.grounding import TitleGroups

    groups = TitleGroups.from_titles(data.titles)
    seqs = data.train_sequences
    users = seqs["user_id"].to_numpy()
    user_client = seqs["client"].to_numpy().astype(np.int64)
    lengths = np.array([len(s) for s in seqs["items"]], dtype=np.int64)
    items = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs["items"]])
    group_of_interaction = groups.group_of[items]
    n_clients, n_groups = data.num_clients, len(groups)

    counts = client_group_counts(np.repeat(user_client, lengths), group_of_interaction, n_clients, n_groups)
    js = divergence_from_whole(counts)
    user_sizes = np.bincount(user_client, minlength=n_clients)
    # the reference: the same users, shuffled into clients of the same sizes
    iid_client = iid_assignment(user_sizes, seed)
    iid_counts = client_group_counts(np.repeat(iid_client, lengths), group_of_interaction, n_clients, n_groups)
    iid_js = divergence_from_whole(iid_counts)
    windows = np.bincount(data.split_frame("train")["client"].to_numpy(), minlength=n_clients)

    rows = [{"client": c, "users": int(user_sizes[c]), "train_windows": int(windows[c]),
             "train_interactions": int(counts[c].sum()), "title_groups_seen": int((counts[c] > 0).sum()),
             "js": float(js[c]), "iid_js": float(iid_js[c])} for c in range(n_clients)]
    settings = data.manifest.get("settings", {})
    summary = {
        "prepared_dir": str(data.path), "dataset": settings.get("dataset"),
        "partitioner": settings.get("partitioner"), "num_clients": n_clients,
        "dirichlet_alpha": settings.get("dirichlet_alpha") if settings.get("partitioner") == "dirichlet" else None,
        "prep_seed": settings.get("seed"), "iid_seed": seed,
        "users": int(len(users)), "title_groups": n_groups, "train_interactions": int(counts.sum()),
        "users_per_client": {"min": int(user_sizes.min()), "median": float(np.median(user_sizes)),
                             "max": int(user_sizes.max())},
        "js": {"mean": float(js.mean()), "max": float(js.max()), "min": float(js.min())},
        "iid_js": {"mean": float(iid_js.mean()), "max": float(iid_js.max()), "min": float(iid_js.min())},
        # what the partition adds to what client size alone gives
        "js_minus_iid": {"mean": float((js - iid_js).mean()), "min": float((js - iid_js).min())},
        "js_base": 2,
    }
    return rows, summary


def plot(rows: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [r["client"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    left.bar(clients, [r["users"] for r in rows], color="tab:blue")
    left.set_xticks(clients)
    left.set_xlabel("client")
    left.set_ylabel("users")
    left.set_title("users per client", fontsize=9)
    width = 0.4
    x = np.arange(len(clients))
    right.bar(x - width / 2, [r["js"] for r in rows], width, label="this partition")
    right.bar(x + width / 2, [r["iid_js"] for r in rows], width, label="iid split, same client sizes")
    right.set_xticks(x, clients)
    right.set_xlabel("client")
    right.set_ylabel("JS divergence from the whole (base 2)")
    right.set_title("item (title-group) distribution over training interactions", fontsize=9)
    right.legend(fontsize=8)
    name = Path(summary["prepared_dir"]).name
    alpha = f" (alpha {summary['dirichlet_alpha']})" if summary["dirichlet_alpha"] is not None else ""
    fig.suptitle(f"{name}: {summary['partitioner']}{alpha}, {summary['num_clients']} clients; JS mean "
                 f"{summary['js']['mean']:.3f} (iid {summary['iid_js']['mean']:.3f})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> None:
    import pandas as pd

    from fellrec_flwr.atomic import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / CSV_NAME, pd.DataFrame(rows).to_csv(index=False).encode())
    atomic_write_bytes(out / JSON_NAME, json.dumps({"summary": summary, "clients": rows}, indent=1).encode())
    plot(rows, summary, out / PNG_NAME)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fellrec_flwr.eval.heterogeneity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prepared_dir", help="a folder written by python -m data_prep")
    ap.add_argument("--out", default="", help="output folder (default: ./heterogeneity/<name of PREPARED_DIR>)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the iid reference split")
    args = ap.parse_args(argv)
    from fellrec_flwr.data.prepared import PreparedData, PreparedDataError

    try:
        data = PreparedData.load(args.prepared_dir)
    except PreparedDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows, summary = measure(data, args.seed)
    out = Path(args.out or Path("heterogeneity") / Path(args.prepared_dir).resolve().name)
    write_report(rows, summary, out)
    for r in rows:
        print(f"client {r['client']:>3}: {r['users']:>6} users, {r['train_windows']:>7} windows, "
              f"JS {r['js']:.4f} (iid {r['iid_js']:.4f})")
    print(f"JS mean {summary['js']['mean']:.4f} max {summary['js']['max']:.4f}; iid mean "
          f"{summary['iid_js']['mean']:.4f} max {summary['iid_js']['max']:.4f}; JS - iid mean "
          f"{summary['js_minus_iid']['mean']:.4f}. Written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
