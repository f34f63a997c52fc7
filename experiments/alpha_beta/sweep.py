"""Gatys et al. 2016, Fig. 3: the ratio α/β against the depth of the style layers, as one grid.

    python experiments/alpha_beta/sweep.py [--preset gatys2016] [--betas 1e2,1e3,1e4,1e5] [--out DIR]

Columns: β with α = 1 (α/β = 10⁻², …, 10⁻⁵); rows: style matched on relu1_1,
then relu1_1 … relu2_1, …, up to relu1_1 … relu5_1, with equal weights w_l =
1/L on the layers used (the paper's rows conv1_1 … conv5_1). The depth is a
choice of layer weights (0 switches a layer off), so the whole grid is one
group: one compiled program for every point.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import study  # noqa: E402

DEPTHS = [[round(1 / d, 6) if i < d else 0 for i in range(5)] for d in range(1, 6)]


def main() -> None:
    parser = study.parser(__doc__, "experiments/alpha_beta/out")
    parser.add_argument("--betas", default="1e2,1e3,1e4,1e5")
    parser.add_argument("--depths", type=int, default=5, help="rows: style layers up to relu1_1 … relu{depths}_1")
    args = parser.parse_args()
    weights = ",".join("[" + ",".join(map(str, w)) + "]" for w in DEPTHS[:args.depths])
    study.run(args.preset, [f"loss.beta={args.betas}", f"loss.style_layer_weights={weights}",
                            "loss.alpha=1"], args.out, args.overrides,
              {"loss.beta": "β (α = 1)", "loss.style_layer_weights": "w_l (relu1_1 … relu5_1)"})


if __name__ == "__main__":
    main()
