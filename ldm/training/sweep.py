"""Local grid sweeps without wandb: ``train.py -c cfg.yaml --sweep 'optim.lr=1e-4,2e-4'``.

Each ``--sweep KEY=V1,V2,...`` adds an axis; the runs are the Cartesian product, trained one
after another, each in its own run directory ``<run.name>-NN-<key>=<value>...``. A summary
table of the final metrics is printed and written to ``<run.root>/<run.name>-sweep.md``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def split_values(text: str) -> list[str]:
    """Split ``a,b,[1,2]`` on top-level commas (commas inside brackets/quotes are kept)."""
    values, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    values.append("".join(current).strip())
    return [v for v in values if v]


def parse_axes(specs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``["k=1,2", "j=a"]`` → ``[("k", ["1", "2"]), ("j", ["a"])]``."""
    axes = []
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"--sweep '{spec}' must be KEY=V1,V2,...")
        key, values = spec.split("=", 1)
        parsed = split_values(values)
        if not parsed:
            raise ValueError(f"--sweep '{spec}' lists no values")
        axes.append((key.strip(), parsed))
    return axes


def grid(specs: Sequence[str]) -> list[list[str]]:
    """All override lists of the sweep's Cartesian product."""
    axes = parse_axes(specs)
    keys = [k for k, _ in axes]
    return [
        [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
        for combo in itertools.product(*(vals for _, vals in axes))
    ]


def run_name(base: str, index: int, overrides: Sequence[str]) -> str:
    """A readable, filesystem-safe run name for one trial."""
    tag = "_".join(o.rsplit(".", 1)[-1] for o in overrides)
    return f"{base}-{index:02d}-" + re.sub(r"[^A-Za-z0-9=._-]+", "", tag)[:80]


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per trial with its overrides and final metrics.

    Losses come first (``val/``, then ``train/``); skip counters (``data/skipped_*``) that are
    zero in every trial are left out.
    """

    def wanted(key: str) -> bool:
        return not key.startswith("data/skipped") or any(r["metrics"].get(key) for r in rows)

    def order(key: str) -> tuple[int, str]:
        prefix = next((i for i, p in enumerate(("val/", "train/")) if key.startswith(p)), 2)
        return prefix, key

    metric_keys = sorted({k for r in rows for k in r["metrics"] if wanted(k)}, key=order)
    header = ["run", "overrides", "status", *metric_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        metrics = [f"{r['metrics'][k]:.4g}" if k in r["metrics"] else "" for k in metric_keys]
        lines.append(
            "| " + " | ".join([r["name"], " ".join(r["overrides"]), r["status"], *metrics]) + " |"
        )
    return "\n".join(lines) + "\n"


def write_summary(root: str | Path, base: str, rows: list[dict[str, Any]]) -> Path:
    path = Path(root) / f"{base}-sweep.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(summary_table(rows))
    return path
