"""How much public warm-up does the tiny model need? Recall@10 vs warm-up steps, on the demo.

    python bench/tiny_warmup_curve.py --prompts 4000 --chunks 4 --users 150 [--hidden 64 --layers 4 --lr 0.003]

Builds the random tiny model for the default demo data, trains it (all weights) on
`--prompts` public warm-up prompts (`fellrec_flwr.model.tiny.public_prompts`: synthetic public
users, none of the clients') in `--chunks` passes, and after each pass ranks the catalogue
for the first `--users` validation users by catalogue-constrained decoding (history
masked). Prints steps, seconds, loss and Recall@10 / NDCG@10 with popularity and Markov on
the same users. Single-threaded. Used to choose the warm-up recipe in `fellrec_flwr.model.tiny`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from flwr.common.config import parse_config_args

    from fellrec_flwr.eval.baselines import FittedBaselines
    from fellrec_flwr.config import EvalSettings, TrainSettings, from_run_config
    from fellrec_flwr.eval.evaluate import rank_constrained
    from fellrec_flwr.eval.grounding import TitleGroups
    from fellrec_flwr.eval.metrics import ranking_metrics, target_ranks
    from fellrec_flwr.data.prompts import build_prompt
    from fellrec_flwr.runtime import prepare_data
    from fellrec_flwr.model.tiny import build_tiny_model, public_prompts, train_tokenizer
    from fellrec_flwr.model.loading import _tokenizer_texts
    from fellrec_flwr.train.trainer import train_local

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", "-c", action="append", default=[])
    parser.add_argument("--prompts", type=int, default=4000)
    parser.add_argument("--chunks", type=int, default=4, help="passes over the prompts, evaluated after each")
    parser.add_argument("--users", type=int, default=150)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--beams", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = from_run_config(parse_config_args(args.run_config) if args.run_config else {})
    data = prepare_data(cfg)
    titles = data.titles
    tok = train_tokenizer(_tokenizer_texts(titles), cfg.model.tiny_vocab, data.path / "tokenizer-curve")
    model = build_tiny_model(tok, hidden=args.hidden, layers=args.layers, heads=args.heads, seed=0)
    prompts = public_prompts(sorted(titles), args.prompts, cfg.data.history_len, seed=0, titles=titles)
    examples = data.split("valid")[: args.users]
    groups = TitleGroups.from_titles(titles)
    catalogue = SimpleNamespace(groups=groups)
    targets = [ex.target for ex in examples]
    fitted = FittedBaselines.fit(data.train_sequences, titles)
    base = {m: ranking_metrics(fitted.ranks(m, examples))["recall@10"] for m in ("popularity", "markov")}
    print(f"{len(examples)} valid users; popularity R@10 {base['popularity']:.3f}, markov {base['markov']:.3f}")
    settings = TrainSettings(local_epochs=1, lr=args.lr, batch_size=args.batch, max_length=256, train_on_inputs=True)
    eval_cfg = EvalSettings(decoding="constrained", constrained_beams=args.beams)
    steps, t0 = 0, time.time()
    for chunk in range(args.chunks + 1):
        loss = float("nan")
        if chunk:
            result = train_local(model, tok, prompts, titles, settings, seed=chunk, progress=False)
            steps += result.steps
            loss = result.loss
        model.eval()
        t1 = time.time()
        ranked = rank_constrained(model, tok, [build_prompt([titles[i] for i in ex.history]) for ex in examples],
                                  [ex.history for ex in examples], catalogue, eval_cfg, 20, progress=False)
        m = ranking_metrics(target_ranks(ranked, targets, canonical=groups.canonical))
        distinct = len({int(i) for i in ranked[:, :10].ravel() if i >= 0})
        print(f"steps {steps:5d} train {time.time() - t0 - (time.time() - t1):6.0f}s loss {loss:.3f} "
              f"R@10 {m['recall@10']:.3f} N@10 {m['ndcg@10']:.3f} R@20 {m['recall@20']:.3f} "
              f"distinct-top10 {distinct} eval {time.time() - t1:.0f}s", flush=True)


if __name__ == "__main__":
    main()
