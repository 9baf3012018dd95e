"""Speed and memory of catalogue-constrained decoding: SmolLM2-135M on Games test users.

    nice -n 10 python bench/constrained_speed.py --users 50                   # this working tree
    nice -n 10 python bench/constrained_speed.py --users 50 --ref cf46942     # the module at a git revision
    nice -n 10 python bench/constrained_speed.py --users 20 --profile prof.out

Same users, data, model and settings as `bench/games_zero_shot.py --phase constrained` (the
first --users of its shuffled test order, beams 20, top 20 + 20 pooled titles, 4 users per
batch, 1 thread). Reports CPU seconds per user (time.process_time: does not grow when other
jobs share the cores) and the search's peak RSS above the RSS before it (the kernel's
high-water mark, reset through /proc/self/clear_refs just before the search; after a one-user
warm-up search, so paging the weights in is not counted). Writes the
ranked lists and scores to --out; with --compare FILE it checks that the lists are identical to
another run's (e.g. the --ref one) and the scores equal to 1e-4.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import games_zero_shot as gz  # noqa: E402  (the data, model and user order of the Games benches)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--pool", type=int, default=40, help="top 20 + this - 20 further titles (as games_zero_shot)")
    ap.add_argument("--batch-users", type=int, default=4)
    ap.add_argument("--ref", default="", help="git revision whose fellrec_flwr/eval/constrained.py to run instead")
    ap.add_argument("--profile", default="", help="write a cProfile of the search here (and print the top)")
    ap.add_argument("--out", default="", help="JSON with the lists, scores and figures")
    ap.add_argument("--compare", default="", help="another run's --out: the lists must be identical")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--games", default=str(gz.SHARED / "data" / "amazon-games"))
    ap.add_argument("--model", default=str(gz.SHARED / "models" / "smollm2-135m-instruct"
                                           / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    return ap.parse_args(argv)


def constrained_module(ref: str):
    """fellrec_flwr.eval.constrained of this tree, or loaded from `ref`'s copy of the file."""
    if not ref:
        from fellrec_flwr.eval import constrained
        return constrained
    text = subprocess.run(["git", "show", f"{ref}:fellrec_flwr/eval/constrained.py"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "constrained_ref.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("constrained_ref", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cfg = gz.config(argparse.Namespace(model=args.model, games=args.games, beams=args.beams))
    data = gz.load_data(cfg)
    model, tok = gz.load_model(cfg, data)
    from fellrec_flwr.eval.grounding import TitleGroups

    cm = constrained_module(args.ref)
    groups = TitleGroups.from_titles(data.titles)
    trie = cm.build_title_trie(tok, groups.titles)
    users = gz.user_order(data, args.seed)[: args.users]
    prompts = [gz.history_prompt_ids(tok, data, ex) for ex in users]
    masked = [groups.group_index(ex.history).tolist() for ex in users]
    # Warm-up on one user (not timed): the first forward pages the weights in and sets up kernels,
    # which would otherwise count as the search's memory.
    cm.constrained_search(model, prompts[:1], trie, gz.K, args.beams, masked[:1], pad_token_id=tok.pad_token_id)
    searched = []  # users per _search_batch call: more than --users in all = some were widened (searched again)
    plain = cm._search_batch

    def counted(model, prompts, *a, **kw):
        searched.append(len(prompts))
        return plain(model, prompts, *a, **kw)

    cm._search_batch = counted
    import gc

    gc.collect()
    before = rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark to the current RSS
    prof = None
    if args.profile:
        import cProfile
        prof = cProfile.Profile()
        prof.enable()
    c0, w0 = time.process_time(), time.time()
    got, scores = cm.constrained_search(model, prompts, trie, gz.K, args.beams, masked,
                                        batch_users=args.batch_users, pad_token_id=tok.pad_token_id,
                                        extra=args.pool - gz.K)
    cpu, wall = time.process_time() - c0, time.time() - w0
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.profile)
        import pstats
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    peak = rss_kb("VmHWM")
    result = {"ref": args.ref or "working tree", "users": len(users), "beams": args.beams, "pool": args.pool,
              "batch_users": args.batch_users, "cpu_seconds_per_user": cpu / len(users),
              "wall_seconds_per_user": wall / len(users), "rss_before_mb": before / 1024,
              "search_peak_above_before_mb": (peak - before) / 1024,
              "user_searches": sum(searched), "batches": len(searched),
              "prompt_tokens": {"mean": float(np.mean([len(p) for p in prompts])),
                                "max": int(max(len(p) for p in prompts))},
              "user_ids": [int(ex.user_id) for ex in users], "groups": got.tolist(),
              "scores": [[float(x) for x in row] for row in scores]}
    print(f"{result['ref']}: {len(users)} users, {result['cpu_seconds_per_user']:.3f} CPU s/user "
          f"({result['wall_seconds_per_user']:.2f} wall), RSS before {result['rss_before_mb']:.0f} MB, "
          f"search peak +{result['search_peak_above_before_mb']:.0f} MB; {result['user_searches']} user searches "
          f"in {result['batches']} batches", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result))
    if args.compare:
        other = json.loads(Path(args.compare).read_text())
        n = min(len(other["groups"]), len(users))
        assert other["user_ids"][:n] == result["user_ids"][:n], "different users"
        same = [other["groups"][i] == result["groups"][i] for i in range(n)]
        a, b = np.asarray(other["scores"][:n]), np.asarray(result["scores"][:n])
        finite = np.isfinite(a) & np.isfinite(b)
        bitwise = bool(np.array_equal(a, b))
        rel = float(np.max(np.abs(a - b)[finite] / np.maximum(np.abs(a[finite]), 1.0), initial=0.0))
        print(f"identical lists for {sum(same)}/{n} users; scores bit-identical: {bitwise} (max relative "
              f"difference {rel:.1e})", flush=True)
        # Another batching changes float32 rounding (~1e-7 relative), never the lists on these users.
        if not all(same) or rel > 1e-5 or not np.array_equal(np.isfinite(a), np.isfinite(b)):
            raise SystemExit("the ranked lists differ from " + args.compare)


if __name__ == "__main__":
    main()
