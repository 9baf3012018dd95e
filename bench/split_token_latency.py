"""Per-token latency of split inference over a keep-alive connection, with and without TCP_NODELAY.

    python bench/split_token_latency.py                 # both modes, 60 steps each
    python bench/split_token_latency.py --steps 200

One generated token = one POST /v1/infer/step of a [1, 1, H] hidden state in an open session of
the tiny model, served in a thread of this process on 127.0.0.1 (plain http on loopback). Mode
`nodelay` is the shipped transport (TCP_NODELAY on the service's and the client's sockets);
mode `nagle` switches it off on both ends, which is how the transport behaved before (hardening
finding 5): the reply body waits for the peer's delayed ACK of the headers. Medians and 90th
percentiles per step; rows go to bench/results/split_token_latency.csv.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import server_app.split_service as service_mod  # noqa: E402
from fellrec_flwr.split import client as split_client  # noqa: E402
from fellrec_flwr.split.auth import issue_token  # noqa: E402
from fellrec_flwr.model.tiny import build_tiny_model, train_tokenizer  # noqa: E402

SECRET = b"bench-secret-not-for-production-0123"
TITLES = ["Super Mario Odyssey", "The Legend of Zelda", "Halo 3", "Minecraft"] * 3


@contextmanager
def nagle() -> Iterator[None]:
    """TCP_NODELAY off on both ends (the transport before the fix)."""
    saved = service_mod._nodelay, split_client._NoDelayHTTPConnection.connect
    service_mod._nodelay = lambda sock: None
    split_client._NoDelayHTTPConnection.connect = http.client.HTTPConnection.connect
    try:
        yield
    finally:
        service_mod._nodelay, split_client._NoDelayHTTPConnection.connect = saved


def measure(url: str, hidden: int, steps: int) -> list[float]:
    client = split_client.SplitServiceClient(url, "bench", issue_token(SECRET, "bench"))
    h = torch.randn(1, 1, hidden)
    _, sid = client.infer_step("", h, None, torch.zeros(1, 1, dtype=torch.int32), 0)
    times = []
    for i in range(1, steps + 1):
        start = time.perf_counter()
        _, sid = client.infer_step(sid, h, None, torch.tensor([[i]], dtype=torch.int32), i)
        times.append(time.perf_counter() - start)
    client.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--modes", default="nagle,nodelay")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "split_token_latency.csv"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(TITLES, 300, Path(tmp) / "tokenizer")
    model = build_tiny_model(tok, hidden=64, layers=4, heads=4, seed=0).eval()
    rows = []
    for mode in args.modes.split(","):
        ctx = nagle() if mode == "nagle" else _nothing()
        with ctx:
            handle = service_mod.start_service(model, SECRET, 1, 1)
            try:
                times = measure(handle.url, 64, args.steps)
            finally:
                handle.stop()
        ms = sorted(t * 1000 for t in times)
        row = {"mode": mode, "steps": len(ms), "median_ms": round(statistics.median(ms), 2),
               "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2), "mean_ms": round(statistics.fmean(ms), 2)}
        rows.append(row)
        print(row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


@contextmanager
def _nothing() -> Iterator[None]:
    yield


if __name__ == "__main__":
    main()
