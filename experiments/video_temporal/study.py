"""γ on a short clip: the temporal error and the style yardstick of each temporal weight, for the
sequential and the parallel schedule, against the per-frame baseline (each frame alone from its
content, γ = 0).

    python experiments/video_temporal/study.py [--preset preview] [--out DIR] [HYDRA OVERRIDES...]

Three batched sweeps through the CLI on the bundled clip (examples/tubingen_pan.mp4, its first 8
frames at 128 px): the baseline; sequential, γ ∈ GAMMAS (60 steps a frame, 100 for the first);
parallel, γ ∈ {0, 1e12} (8 passes of 15 steps, the temporal term from pass 2). Writes DIR/table.md
(per run: temporal error, style and content yardsticks, steps per frame, seconds; and the parallel
runs' temporal error after each pass) and DIR/strip.png (frames 0, 3 and 7 of four runs).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import study  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent.parent
GAMMAS = "0,1e11,1e12,1e13"
COMMON = [f"video.input={ROOT / 'examples' / 'tubingen_pan.mp4'}", "video.frames=[0,8,1]", "image.size=128",
          "save_every=0", "progress=false"]
SWEEPS = {
    "baseline": ["video.schedule=sequential", "video.init=init", "video.temporal_weight=0", "optim.steps=60",
                 "video.first_frame_steps=100"],
    "sequential": ["video.schedule=sequential", f"video.temporal_weight={GAMMAS}", "optim.steps=60",
                   "video.first_frame_steps=100"],
    "parallel": ["video.schedule=parallel", "video.temporal_weight=0,1e12", "video.passes=8", "optim.steps=15",
                 "video.temporal_from_pass=2"],
}


def frames_rows(run: Path) -> list[dict]:
    with open(run / "frames.csv", newline="") as f:
        return list(csv.DictReader(f))


def per_pass(run: Path) -> list[float]:
    """The mean temporal error of each pass."""
    rows = frames_rows(run)
    passes = sorted({int(r["pass"]) for r in rows})
    return [float(np.mean([float(r["temporal_error"]) for r in rows if int(r["pass"]) == p and r["temporal_error"]]))
            for p in passes]


def strip(path: Path, runs: list[tuple[str, Path]], picks=(0, 3, 7)) -> None:
    tiles = [[Image.open(run / "frames" / f"{k:06d}.png").convert("RGB") for k in picks] for _, run in runs]
    w, h = tiles[0][0].size
    label = 120
    out = Image.new("RGB", (label + len(picks) * (w + 4), len(runs) * (h + 4)), "white")
    draw = ImageDraw.Draw(out)
    for i, ((name, _), row) in enumerate(zip(runs, tiles)):
        draw.text((4, i * (h + 4) + h // 2), name, fill="black")
        for j, im in enumerate(row):
            out.paste(im, (label + j * (w + 4), i * (h + 4)))
    out.save(path)


def main() -> None:
    a = study.parser(__doc__, "experiments/video_temporal/out").parse_args()
    lines = ["| schedule | start | γ | steps a frame | temporal error | style yardstick | content yardstick | run s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    found: dict[str, list[tuple[dict, Path]]] = {}
    for name, sweep in SWEEPS.items():
        runs = a.out / name
        rows = study.sweep_rows(a.preset, sweep, runs, [*COMMON, *a.overrides])
        found[name] = [(r, runs / r["n"]) for r in rows]
        for r, run in found[name]:
            steps = "15 × 8 passes" if name == "parallel" else "60 (first 100)"
            start = "content" if name == "baseline" else ("previous, warped" if name == "sequential" else "blend")
            lines.append(f"| {name} | {start} | {float(r.get('video.temporal_weight') or 0):.0e} | {steps} | "
                         f"{float(r['temporal_error']):.3g} | {float(r['yardstick_style']):.4g} | "
                         f"{float(r['yardstick_content']):.4g} | {float(r['run_seconds']):.0f} |")
    lines += ["", "Parallel: the mean temporal error after each pass", "",
              "| γ | " + " | ".join(f"pass {p}" for p in range(1, 9)) + " |", "|" + " --- |" * 9]
    for r, run in found["parallel"]:
        lines.append(f"| {float(r['video.temporal_weight']):.0e} | "
                     + " | ".join(f"{e:.3g}" for e in per_pass(run)) + " |")
    (a.out / "table.md").write_text("\n".join(lines) + "\n")
    seq = {float(r["video.temporal_weight"]): run for r, run in found["sequential"]}
    par = {float(r["video.temporal_weight"]): run for r, run in found["parallel"]}
    strip(a.out / "strip.png", [("per frame", found["baseline"][0][1]), ("sequential gamma=0", seq[0.0]),
                                ("sequential gamma=1e12", seq[1e12]), ("parallel gamma=1e12", par[1e12])])
    print((a.out / "table.md").read_text())


if __name__ == "__main__":
    main()
