"""The content/style trade-off: one Hydra multirun over β, then a table and a contact sheet.

    python experiments/beta_sweep/sweep.py [--preset preview] [--betas 1e2,1e3,1e4,1e5] [--out DIR]

Runs ``python -m nstjax.run -m +experiment=PRESET loss.beta=...`` (one job per
β, each in its own directory under DIR/runs), then writes DIR/table.md (final
content and style losses, steps, evaluations, time per point) and
DIR/sheet.png (the results side by side, labelled with β).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf
from PIL import Image, ImageDraw


def run_sweep(preset: str, betas: str, runs: Path, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "nstjax.run", "-m", f"+experiment={preset}",
           f"loss.beta={betas}", f"hydra.sweep.dir={runs}", *extra]
    subprocess.run(cmd, check=True)


def collect(runs: Path) -> list[dict]:
    points = []
    for d in sorted((p for p in runs.iterdir() if (p / "metrics.json").exists()),
                    key=lambda p: int(p.name)):
        metrics = json.loads((d / "metrics.json").read_text())
        beta = OmegaConf.load(d / "config.yaml").loss.beta
        points.append({"dir": d, "beta": beta, **metrics})
    return sorted(points, key=lambda p: p["beta"])


def write_table(points: list[dict], path: Path) -> None:
    lines = ["| β | content (α·L) | style (β·L) | steps | evaluations | run s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for p in points:
        lines.append(f"| {p['beta']:.0e} | {p['content']:.4g} | {p['style']:.4g} | {p['steps']} "
                     f"| {p['loss_evaluations']} | {p['run_seconds']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def write_sheet(points: list[dict], path: Path) -> None:
    tiles = [Image.open(p["dir"] / "result.png").convert("RGB") for p in points]
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    sheet = Image.new("RGB", (w * len(tiles), h + 20), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, p) in enumerate(zip(tiles, points)):
        sheet.paste(tile, (i * w, 20))
        draw.text((i * w + 4, 4), f"beta = {p['beta']:.0e}", fill="black")
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="preview")
    parser.add_argument("--betas", default="1e2,1e3,1e4,1e5")
    parser.add_argument("--out", type=Path, default=Path("experiments/beta_sweep/out"))
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. image.size=128")
    args = parser.parse_args()
    runs = args.out / "runs"
    if not runs.exists():
        run_sweep(args.preset, args.betas, runs, args.overrides)
    points = collect(runs)
    write_table(points, args.out / "table.md")
    write_sheet(points, args.out / "sheet.png")
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
