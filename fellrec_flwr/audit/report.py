"""Write an audit's results: CSV, a recovery-vs-k plot and a short markdown report (all atomic)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from fellrec_flwr.atomic import atomic_write_bytes, atomic_write_text  # noqa: E402

METRICS = {"token_acc": "history token accuracy", "history_item_recall": "history items identified",
           "target_item_recall": "target items identified"}
TABLE_COLUMNS = ["k", "direction", "observed", "hidden_index", "token_acc", "history_item_recall",
                 "target_token_acc", "target_item_recall", "n_eval"]


def markdown_table(df: pd.DataFrame, columns: list[str], digits: int = 3) -> str:
    """A GitHub markdown table (pandas' to_markdown needs the optional `tabulate`)."""
    def cell(value: Any) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for _, row in df.iterrows()]
    return "\n".join(lines)


def plot_recovery(df: pd.DataFrame, title: str = "") -> bytes:
    """PNG: one panel per direction, recovery metrics vs k (activations solid, gradients dashed)."""
    main = df[df["observed"] != "activation+noise"]
    directions = [d for d in ("front", "back") if d in set(main["direction"])]
    fig, axes = plt.subplots(1, max(len(directions), 1), figsize=(5.5 * max(len(directions), 1), 4), squeeze=False)
    for ax, direction in zip(axes[0], directions):
        part = main[main["direction"] == direction]
        for kind, style in (("activation", "-"), ("gradient", "--")):
            rows = part[part["observed"] == kind].sort_values("k")
            if rows.empty:
                continue
            for (metric, label), marker in zip(METRICS.items(), "osd"):
                ax.plot(rows["k"], rows[metric], style, marker=marker, label=f"{kind}: {label}")
        ax.set_xticks(sorted(set(part["k"])))
        ax.set_title(f"{direction} cut: layers kept by the client = k")
        ax.set_xlabel("k")
        ax.set_ylabel("recovered (held-out real users)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def render_report(df: pd.DataFrame, settings: Mapping[str, Any], command: str, title: str) -> str:
    noise = df[df["observed"] == "activation+noise"]
    main = df[df["observed"] != "activation+noise"]
    parts = [
        f"# Privacy audit: {title}", "",
        f"Command: `{command}`", "",
        "What the server can read back from what crosses each cut (see docs/privacy_audit.md for the "
        "threat model and the metrics). `k` = decoder layers the client keeps on that side; "
        "`hidden_index` = the hidden state observed (input of that layer).", "",
        markdown_table(main, TABLE_COLUMNS), "",
    ]
    if not noise.empty:
        parts += ["## Gaussian-noise defence at the front cut", "",
                  "sigma = noise std relative to the RMS entry of each sent vector; `lm_loss` = the model's "
                  "loss on the real sequences with that noise injected (the price).", "",
                  markdown_table(noise, ["k", "noise_sigma", "token_acc", "history_item_recall",
                                         "target_item_recall", "lm_loss"]), ""]
    parts += ["Settings:", "", "```json", json.dumps(dict(settings), indent=2, default=str), "```", ""]
    return "\n".join(parts)


def write_results(out_dir: str | Path, df: pd.DataFrame, settings: Mapping[str, Any], command: str,
                  title: str) -> dict[str, Path]:
    """audit.csv, audit.png, report.md and settings.json under ``out_dir``."""
    out = Path(out_dir)
    paths = {"csv": out / "audit.csv", "png": out / "audit.png", "report": out / "report.md",
             "settings": out / "settings.json"}
    atomic_write_text(paths["csv"], df.to_csv(index=False, float_format="%.6g"))
    atomic_write_bytes(paths["png"], plot_recovery(df, title))
    atomic_write_text(paths["report"], render_report(df, settings, command, title))
    atomic_write_text(paths["settings"], json.dumps(dict(settings), indent=2, default=str) + "\n")
    return paths


# -- the defences' privacy-quality curve (audit/curve.py) ---------------------------------------------

GOAL_RECOVERY, GOAL_RELATIVE_LOSS = 0.10, 0.05  # issue 25: recovery <= 10 % at <= 5 % relative Recall@10 loss


def relative_loss(df: pd.DataFrame) -> pd.Series:
    """Per row, 1 - recall@10 / recall@10 at strength 0 (0 where that baseline is 0)."""
    base = float(df.loc[df["strength"] == 0, "recall@10"].iloc[0])
    return (1 - df["recall@10"] / base) if base > 0 else df["recall@10"] * 0.0


def plot_curve(df: pd.DataFrame, title: str = "") -> bytes:
    """PNG: history items recovered (top-1 solid, top-5 dotted) against Recall@10, one line per defence,
    each starting at strength 0; the shaded box is the issue's goal."""
    base = df[df["strength"] == 0].iloc[0]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, defence in enumerate(d for d in dict.fromkeys(df["defence"]) if d != "none"):
        part = pd.concat([df[df["strength"] == 0].head(1), df[df["defence"] == defence].sort_values("strength")])
        color = f"C{i}"
        ax.plot(part["recall@10"], part["recovery_top1"], "-o", color=color, label=f"{defence}: top-1")
        ax.plot(part["recall@10"], part["recovery_top5"], ":", color=color, alpha=0.7, label=f"{defence}: top-5")
        for _, row in part.iloc[1:].iterrows():
            ax.annotate(f"{row['strength']:g}", (row["recall@10"], row["recovery_top1"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", color=color)
    r0 = float(base["recall@10"])
    ax.axhspan(0, GOAL_RECOVERY, xmin=0, xmax=1, color="green", alpha=0.08)
    ax.axvline(r0 * (1 - GOAL_RELATIVE_LOSS), color="green", ls="--", lw=0.8,
               label="goal: recovery <= 10 % at <= 5 % recall loss")
    ax.set_xlabel("Recall@10 (quality)")
    ax.set_ylabel("history items recovered by the server")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


DEFENCE_ORDER = ("none", "noise", "front-k", "nopeek")


def merge_curve(out_dir: str | Path, df: pd.DataFrame, detail: pd.DataFrame, settings: Mapping[str, Any],
                command: str) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any], str]:
    """This run's rows merged into the curve already under ``out_dir`` (same defence and strength:
    this run's row wins). The recall CIs are paired against strength 0, so both runs must have
    measured the same strength-0 recall (same users, same client): otherwise this is an error."""
    from fellrec_flwr.audit.sequences import AuditError

    out = Path(out_dir)
    old = pd.read_csv(out / "curve.csv")
    old_detail = pd.read_csv(out / "curve-detail.csv") if (out / "curve-detail.csv").is_file() else detail.iloc[:0]
    if "attacker" not in old_detail.columns:  # written before the client-model attacker existed
        old_detail = old_detail.assign(attacker="base model")
    dataset = str(df["dataset"].iloc[0])
    same = old[(old["dataset"].astype(str) == dataset) & (old["strength"] == 0)]
    mine, theirs = df[df["strength"] == 0].iloc[0], (same.iloc[0] if len(same) else df[df["strength"] == 0].iloc[0])
    if abs(float(mine["recall@10"]) - float(theirs["recall@10"])) > 1e-9 or int(mine["n_users"]) != int(theirs["n_users"]):
        raise AuditError(f"--append: this run's strength-0 recall@10 {mine['recall@10']} on {mine['n_users']} users "
                         f"differs from the existing {theirs['recall@10']} on {theirs['n_users']}: the paired "
                         "intervals would not share a baseline; rerun every line in one run.")
    def keys(frame: pd.DataFrame, data: str | None = None) -> list[tuple[str, str, float]]:
        names = frame["dataset"].astype(str) if data is None else [data] * len(frame)
        return [(n, str(d), float(s)) for n, d, s in zip(names, frame["defence"], frame["strength"])]

    new_keys = set(keys(df))
    kept = old[[k not in new_keys for k in keys(old)]]
    merged = pd.concat([kept, df], ignore_index=True)
    # curve-detail.csv has no dataset column: its rows are the dataset of the run that wrote them
    old_data = str(old["dataset"].iloc[0]) if len(old) and old["dataset"].nunique() == 1 else dataset
    kept_d = old_detail[[k not in new_keys for k in keys(old_detail, old_data)]]
    merged_detail = pd.concat([kept_d, detail], ignore_index=True)

    def ordered(frame: pd.DataFrame) -> pd.DataFrame:
        rank = frame["defence"].map({d: i for i, d in enumerate(DEFENCE_ORDER)}).fillna(len(DEFENCE_ORDER))
        by = ["dataset", "_r", "strength"] if "dataset" in frame.columns else ["_r", "strength"]
        return frame.assign(_r=rank).sort_values(by, kind="stable").drop(columns="_r") \
            .reset_index(drop=True)

    earlier = json.loads((out / "settings.json").read_text()) if (out / "settings.json").is_file() else {}
    runs = earlier.get("runs", [earlier]) if earlier else []
    old_report = (out / "report.md").read_text() if (out / "report.md").is_file() else ""
    commands = [line[len("Command: `"):-1] for line in old_report.splitlines() if line.startswith("Command: `")]
    return (ordered(merged), ordered(merged_detail)[list(detail.columns)], {"runs": [*runs, dict(settings)]},
            " ; ".join([*commands, command]))


def write_curve(out_dir: str | Path, df: pd.DataFrame, detail: pd.DataFrame, settings: Mapping[str, Any],
                command: str, title: str) -> dict[str, Path]:
    """curve.csv (the issue's columns), curve-detail.csv (per channel), curve.png, report.md, settings.json."""
    out = Path(out_dir)
    paths = {"csv": out / "curve.csv", "detail": out / "curve-detail.csv", "png": out / "curve.png",
             "report": out / "report.md", "settings": out / "settings.json"}
    atomic_write_text(paths["csv"], df.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(paths["detail"], detail.to_csv(index=False, float_format="%.6g"))
    atomic_write_bytes(paths["png"], plot_curve(df, f"wire defences: {title}"))
    shown = df.assign(relative_loss=relative_loss(df))
    report = "\n".join([
        f"# Wire defences, privacy vs quality: {title}", "", f"Command: `{command}`", "",
        "recovery = history items the server identifies (the larger of its two channels, front activation "
        "and back gradient); recall_ci = 95 % paired-bootstrap interval of recall@10 minus recall@10 at "
        "strength 0; relative_loss = 1 - recall@10 / recall@10 at strength 0.", "",
        markdown_table(shown, [*df.columns, "relative_loss"]), "", "Per channel:", "",
        markdown_table(detail, list(detail.columns)), "",
        "Settings:", "", "```json", json.dumps(dict(settings), indent=2, default=str), "```", ""])
    atomic_write_text(paths["report"], report)
    atomic_write_text(paths["settings"], json.dumps(dict(settings), indent=2, default=str) + "\n")
    return paths
