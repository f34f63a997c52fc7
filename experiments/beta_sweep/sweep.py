"""The content/style trade-off: one batched sweep over β, then a table and a contact sheet.

    python experiments/beta_sweep/sweep.py [--preset preview] [--betas 1e2,1e3,1e4,1e5] [--out DIR]

Runs ``python -m nstjax.run -m +experiment=PRESET loss.beta=...`` (every β a
member of one compiled program, each point in its own directory under DIR/runs),
then writes DIR/table.md (the yardsticks, steps, evaluations and time of each
point) and DIR/sheet.png (the results side by side, labelled with β).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import study  # noqa: E402


def main() -> None:
    parser = study.parser(__doc__, "experiments/beta_sweep/out")
    parser.add_argument("--betas", default="1e2,1e3,1e4,1e5")
    args = parser.parse_args()
    study.run(args.preset, [f"loss.beta={args.betas}"], args.out, args.overrides, {"loss.beta": "β"})


if __name__ == "__main__":
    main()
