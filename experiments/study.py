"""What the studies in experiments/ share: one batched sweep through the CLI, then a table.

A study runs ``python -m nstjax.run -m +experiment=PRESET SWEEP... EXTRA...`` into
OUT/runs (nstjax's sweeper optimises the points that share a structure as one
program and writes sweep.csv and sheet.png there), then writes OUT/table.md from
sweep.csv and copies the sheet to OUT/sheet.png.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from nstjax.sweeps import SUMMARY_COLUMNS

TABLE_COLUMNS = (("yardstick_content", "content yardstick"), ("yardstick_style", "style yardstick"),
                 ("status", "status"), ("steps", "steps"), ("loss_evaluations", "evaluations"),
                 ("run_seconds", "run s"))


def parser(doc: str, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--preset", default="preview")
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. image.size=128")
    return p


def _number(text: str) -> str:
    try:
        return f"{float(text):.4g}"
    except ValueError:
        return text


def sweep_rows(preset: str, sweep: Sequence[str], runs: Path, extra: Sequence[str]) -> list[dict]:
    """Run ``python -m nstjax.run -m +experiment=PRESET SWEEP... EXTRA...`` into ``runs`` (unless it
    holds the sweep already) and return its sweep.csv rows."""
    if not (runs / "sweep.csv").exists():
        cmd = [sys.executable, "-m", "nstjax.run", "-m", f"+experiment={preset}", *sweep,
               f"hydra.sweep.dir={runs}", *extra]
        code = subprocess.run(cmd).returncode
        if code not in (0, 3):  # 3: a point diverged, which the table shows
            sys.exit(code)
    with open(runs / "sweep.csv", newline="") as f:
        return list(csv.DictReader(f))


def run(preset: str, sweep: Sequence[str], out: Path, extra: Sequence[str],
        labels: dict[str, str] | None = None,
        columns: Sequence[tuple[str, Callable[[dict], str]]] = ()) -> list[dict]:
    """Run the sweep (unless OUT/runs holds it already), write OUT/table.md and OUT/sheet.png,
    print the table; ``labels`` names the swept keys in the table's header, ``columns`` adds
    (header, cell of a sweep.csv row) columns after them."""
    runs = out / "runs"
    rows = sweep_rows(preset, sweep, runs, extra)
    swept = list(rows[0])[1:len(rows[0]) - len(SUMMARY_COLUMNS)]
    labels = labels or {}
    head = ["n", *(labels.get(k, k) for k in swept), *(name for name, _ in columns),
            *(name for _, name in TABLE_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["n"], *(r[k] for k in swept), *(cell(r) for _, cell in columns),
                 *(_number(r[k]) for k, _ in TABLE_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    shutil.copyfile(runs / "sheet.png", out / "sheet.png")
    print((out / "table.md").read_text())
    return rows
