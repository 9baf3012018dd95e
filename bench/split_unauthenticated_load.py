"""What senders without credentials can do to the split service (issue 24's two goals).

    python bench/split_unauthenticated_load.py                  # 32 silent senders, 3 x 200 MB
    python bench/split_unauthenticated_load.py --silent 64 --mb 400

The tiny model is served in a thread of this process on 127.0.0.1 with the default limits,
except that the message limit is raised to 512 MB so that only the credential check stands
between a big unauthenticated message and the service's memory.

1. Silent senders: `--silent` raw HTTP/2 connections, each with one call whose headers are sent
   and whose message never is (a third with no credentials, a third with a wrong token, a third
   calling Health). With them connected: `--calls` Health calls (a fresh connection each, 10 s
   deadline) and as many authenticated Forwards of [1, 3, 64]; median and maximum latency.
   Goal: Health < 1 s.
2. Big messages: three concurrent `--mb` MB Forward messages without credentials, then one with a
   wrong token, then one Health call with a `--mb` MB body, each from a separate process (its
   memory is not the service's). The service's RSS is sampled every 5 ms; the rise from before
   to the peak is reported. Goal: < 50 MB for the three.

Rows go to bench/results/split_unauthenticated_load.csv. Run it on the code before issue 24 (a
checkout of 3512b5a) to see the "before" figures: the script uses nothing that code lacks.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import torch  # noqa: E402

from fellrec_flwr.model.tiny import build_tiny_model, train_tokenizer  # noqa: E402
from fellrec_flwr.split.auth import issue_token  # noqa: E402
from fellrec_flwr.split.wire import encode, method_path  # noqa: E402
from server_app.split_service import ServiceLimits, start_service  # noqa: E402

SECRET = b"bench-secret-not-for-production-0123"
WRONG = (("x-client-key", "mallory"), ("x-client-token", "0" * 64))

SENDER = """
import grpc, json, sys, threading
body = b"\\0" * ({mb} << 20)
codes = []
def send(metadata):
    with grpc.insecure_channel("127.0.0.1:{port}", options=[("grpc.max_send_message_length", -1)]) as channel:
        try:
            channel.unary_unary("{path}")(body, metadata=metadata, timeout=120)
            codes.append("OK")
        except grpc.RpcError as err:
            codes.append(err.code().name)
threads = [threading.Thread(target=send, args=(m,)) for m in {metadatas!r}]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(sorted(codes)))
"""


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _literal(name: str, value: str) -> bytes:  # HPACK literal without indexing, no Huffman, short strings
    return b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


def silent_call(port: int, method: str, metadata: tuple = ()) -> socket.socket:
    """One connection whose one call sends its headers and never its message."""
    headers = b"".join(_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", method_path(method)), (":authority", "x"),
        ("content-type", "application/grpc"), ("te", "trailers"), *metadata))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0) + _frame(1, 4, 1, headers))
    return sock


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(call) -> tuple[float, str]:
    start = time.monotonic()
    try:
        call()
        code = "OK"
    except grpc.RpcError as err:
        code = err.code().name
    return time.monotonic() - start, code


def silent_senders(port: int, n: int, auth: tuple, calls: int) -> list[dict]:
    kinds = [("Forward", ()), ("Forward", WRONG), ("Health", ())]
    socks = [silent_call(port, *kinds[i % 3]) for i in range(n)]
    time.sleep(0.5)  # every call has reached the service
    hidden = encode({"hidden": torch.randn(1, 3, 64), "position_ids": torch.arange(3, dtype=torch.int32)[None]})
    rows = []
    try:
        for method, body, metadata in (("Health", b"", None), ("Forward", hidden, auth)):
            times, codes = [], []
            for _ in range(calls):
                with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # a fresh connection each time
                    t, code = timed(lambda: channel.unary_unary(method_path(method))(body, metadata=metadata,
                                                                                      timeout=10))
                times.append(t)
                codes.append(code)
            rows.append({"test": f"{n} silent senders", "call": method, "ok": f"{codes.count('OK')}/{calls}",
                         "median_ms": round(statistics.median(times) * 1000, 1),
                         "max_ms": round(max(times) * 1000, 1)})
    finally:
        for sock in socks:
            sock.close()
    return rows


def big_messages(port: int, mb: int, method: str, metadatas: list) -> dict:
    peak, done = [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    before = rss_mb()
    sampler = threading.Thread(target=sample)
    sampler.start()
    script = SENDER.format(mb=mb, port=port, path=method_path(method), metadatas=metadatas)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    time.sleep(0.3)
    done.set()
    sampler.join()
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return {"test": f"{len(metadatas)} x {mb} MB {method}", "call": "no credentials" if metadatas[0] is None
            else ("wrong token" if method != "Health" else "Health"), "ok": ",".join(json.loads(out.stdout)),
            "rss_before_mb": round(before), "rss_peak_mb": round(peak[0]), "rss_after_mb": round(rss_mb()),
            "rise_mb": round(peak[0] - before), "seconds": round(elapsed, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--silent", type=int, default=32, help="silent senders")
    ap.add_argument("--calls", type=int, default=20, help="Health calls and Forwards timed (10 s deadline each)")
    ap.add_argument("--mb", type=int, default=200, help="size of each big message")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "split_unauthenticated_load.csv"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = train_tokenizer(["Super Mario Odyssey", "The Legend of Zelda", "Halo 3"] * 5, 300,
                          Path(tempfile.mkdtemp()) / "tok")
    full = build_tiny_model(tok, hidden=64, layers=4, heads=4, seed=0).eval()
    handle = start_service(full, SECRET, 1, 1, limits=ServiceLimits(max_body_bytes=512 << 20))
    auth = (("x-client-key", "bench"), ("x-client-token", issue_token(SECRET, "bench")))
    try:
        rows = silent_senders(handle.port, args.silent, auth, args.calls)
        rows.append(big_messages(handle.port, args.mb, "Forward", [None, None, None]))
        rows.append(big_messages(handle.port, args.mb, "Forward", [WRONG]))
        rows.append(big_messages(handle.port, args.mb, "Health", [None]))
    finally:
        handle.stop()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for row in rows:
        print(row)
    fields = sorted({k for row in rows for k in row}, key=lambda k: [k for r in rows for k in r].index(k))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
