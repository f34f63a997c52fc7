"""The style losses side by side: one content/style pair optimised with each, β set per loss so that
every style term starts at the size of the Gram loss's.

    python experiments/style_losses/sweep.py [--preset preview] [--losses gram,mean_std,...]
        [--beta-gram B] [--out DIR] [HYDRA OVERRIDES...]

Two batched sweeps through the CLI, every loss a group of its own:

1. calibration (DIR/calibration): every loss at β = 1 and ``optim.steps=0``, so sweep.csv's
   ``style`` is L_loss(x₀) = Σ_l w_l E_l at the initial image x₀ (the compiled programs are kept
   in the compilation cache and reused by the second sweep: steps are not part of them);
2. the study (DIR/runs): β_loss = β_gram · L_gram(x₀) / L_loss(x₀), so that every run starts with
   the style term β_gram · L_gram(x₀). β_gram is the preset's ``loss.beta`` (or ``--beta-gram``,
   or a ``loss.beta=`` override). A Hydra sweep is a product of its keys, so each loss's
   (style_loss, β) pair is an option of a config group written for the study
   (DIR/conf/study_loss/LOSS.yaml, swept as ``+study_loss=gram,mean_std,...``).

Writes DIR/table.md (β, yardsticks, steps, evaluations, run time and seconds per evaluation of
each loss), DIR/sheet.png (the results side by side) and DIR/betas.json. Running it again with
the same DIR only rebuilds the table and the sheet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import study  # noqa: E402

from nstjax import config  # noqa: E402
from nstjax.style_losses import STYLE_LOSSES  # noqa: E402

GROUP = "study_loss"
SET_HERE = ("loss.beta", "loss.style_loss")
"""Keys the study sets per loss: taken out of the overrides (a ``loss.beta=`` one becomes β_gram)."""


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def betas(calibration: list[dict], beta_gram: float) -> dict[str, float]:
    """β_loss = β_gram · L_gram(x₀) / L_loss(x₀) from the calibration sweep's rows (run at β = 1)."""
    style = {r["loss.style_loss"]: float(r["style"]) for r in calibration}
    bad = [name for name, value in style.items() if not value > 0]
    if bad:
        sys.exit(f"error: the style term of {', '.join(bad)} is 0 at the initial image: nothing to scale by")
    return {name: beta_gram * style["gram"] / value for name, value in style.items()}


def write_group(conf: Path, chosen: dict[str, float]) -> None:
    """DIR/conf/study_loss/LOSS.yaml: ``loss.style_loss`` and ``loss.beta`` of each loss."""
    folder = conf / GROUP
    folder.mkdir(parents=True, exist_ok=True)
    for name, beta in chosen.items():
        (folder / f"{name}.yaml").write_text(f"# @package loss\nstyle_loss: {name}\nbeta: {beta!r}\n")


def main() -> None:
    parser = study.parser(__doc__, "experiments/style_losses/out")
    parser.add_argument("--losses", default=",".join(STYLE_LOSSES))
    parser.add_argument("--beta-gram", type=float, default=None,
                        help="β of the gram loss, the others scaled to it (default: the preset's loss.beta)")
    args = parser.parse_args()
    losses = args.losses.split(",")
    unknown = [name for name in losses if name not in STYLE_LOSSES]
    if unknown:
        sys.exit(f"error: unknown style loss {', '.join(unknown)}; choose from {', '.join(STYLE_LOSSES)}")
    beta_gram = args.beta_gram or config.compose([f"+experiment={args.preset}", *args.overrides]).loss.beta
    extra = [o for o in args.overrides if _key(o) not in SET_HERE]
    measured = ["gram", *(name for name in losses if name != "gram")]
    calibration = study.sweep_rows(
        args.preset, [f"loss.style_loss={','.join(measured)}", "loss.beta=1"], args.out / "calibration",
        [o for o in extra if _key(o) != "optim.steps"] + ["optim.steps=0"])
    chosen = {name: beta for name, beta in betas(calibration, beta_gram).items() if name in losses}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "betas.json").write_text(json.dumps({"beta_gram": beta_gram, "betas": chosen}, indent=1) + "\n")
    conf = (args.out / "conf").resolve()
    write_group(conf, chosen)
    study.run(args.preset, [f"hydra.searchpath=[file://{conf}]", f"+{GROUP}={','.join(losses)}"], args.out,
              extra, {f"+{GROUP}": "`loss.style_loss`"},
              [("β", lambda r: f"{chosen[r[f'+{GROUP}']]:.3g}"),
               ("s / evaluation", per_evaluation)])


def per_evaluation(row: dict) -> str:
    """Run seconds over objective evaluations (each loss is a group of one: its own time)."""
    if not (row["run_seconds"] and row["loss_evaluations"]):
        return ""
    return f"{float(row['run_seconds']) / float(row['loss_evaluations']):.3g}"


if __name__ == "__main__":
    main()
