"""Layer ablation: the style matched at one layer at a time, beside all five together.

    python experiments/layer_ablation/sweep.py [--preset gatys2016] [--out DIR]

Points: w_l one-hot on relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (a weight
of 0 switches a layer off), then w_l = 1/5 on all of them (Gatys et al.); all
points are members of one compiled program. The yardsticks measure every point
on the same scale, whichever layers it optimised.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import study  # noqa: E402

LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")


def main() -> None:
    parser = study.parser(__doc__, "experiments/layer_ablation/out")
    args = parser.parse_args()
    one_hot = ["[" + ",".join("1" if i == j else "0" for i in range(5)) + "]" for j in range(5)]
    weights = ",".join(one_hot + ["[0.2,0.2,0.2,0.2,0.2]"])
    study.run(args.preset, [f"loss.style_layers=[{','.join(LAYERS)}]", f"loss.style_layer_weights={weights}"],
              args.out, args.overrides, {"loss.style_layer_weights": "w_l (relu1_1 … relu5_1)"})


if __name__ == "__main__":
    main()
