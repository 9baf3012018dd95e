"""Per-token latency of split inference through the gRPC split service.

    python bench/split_token_latency.py                 # plaintext and TLS, 60 steps each
    python bench/split_token_latency.py --steps 200 --modes plain

One generated token = one InferStep call of a [1, 1, H] hidden state in an open session of the
tiny model, served in a thread of this process on 127.0.0.1 (one gRPC channel, kept open). Mode
`plain` is plaintext gRPC on loopback (what a simulation uses), `tls` gRPC over TLS with a
throw-away self-signed certificate (needs openssl; what a deployment uses). Medians and 90th
percentiles per step; rows go to bench/results/split_token_latency.csv.

For comparison, the former transport (HTTP/1.1 keep-alive on the standard library's http.server,
same tiny model, same box) measured 44.1 ms median per token with Nagle's algorithm on both ends
and 8.0 ms with TCP_NODELAY (docs/security.md, finding 5).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def measure(url: str, hidden: int, steps: int, ca_file: Path | None = None) -> list[float]:
    client = split_client.SplitServiceClient(url, "bench", issue_token(SECRET, "bench"), ca_file=ca_file)
    h = torch.randn(1, 1, hidden)
    _, sid = client.infer_step("", h, None, torch.zeros(1, 1, dtype=torch.int32), 0)
    times = []
    for i in range(1, steps + 1):
        start = time.perf_counter()
        _, sid = client.infer_step(sid, h, None, torch.tensor([[i]], dtype=torch.int32), i)
        times.append(time.perf_counter() - start)
    client.close()
    return times


def self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--modes", default="plain,tls")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "split_token_latency.csv"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(TITLES, 300, Path(tmp) / "tokenizer")
        model = build_tiny_model(tok, hidden=64, layers=4, heads=4, seed=0).eval()
        for mode in args.modes.split(","):
            cert = key = None
            if mode == "tls":
                if shutil.which("openssl") is None:
                    print("skipping tls: openssl is not installed")
                    continue
                cert, key = self_signed(Path(tmp))
            handle = service_mod.start_service(model, SECRET, 1, 1, tls_cert=cert, tls_key=key)
            try:
                times = measure(handle.url, 64, args.steps, ca_file=cert)
            finally:
                handle.stop()
            ms = sorted(t * 1000 for t in times)
            row = {"transport": "grpc", "mode": mode, "steps": len(ms), "median_ms": round(statistics.median(ms), 2),
                   "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 2), "mean_ms": round(statistics.fmean(ms), 2)}
            rows.append(row)
            print(row, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
