"""The bundled clip examples/tubingen_pan.mp4: a pan and slow zoom over examples/tubingen.jpg with
examples/chelsea.png's cat (a disc of it) moving across, 24 frames of 320×240 at 12 fps.

    python experiments/video_temporal/make_clip.py [--out examples/tubingen_pan.mp4]

The camera moves 3 px and zooms 0.6 % a frame, the cat 6 px right and 2 px down a frame: the flow
has a global part, a disocclusion trail behind the cat and a strip entering at the edge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from nstjax import frames, images

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
SIZE = (240, 320)
COUNT, FPS = 24, 12


def clip() -> list[np.ndarray]:
    photo = images.load_image(EXAMPLES / "tubingen.jpg")
    cat = images.resize_longest(images.load_image(EXAMPLES / "chelsea.png"), 96)
    ch, cw = cat.shape[:2]
    yy, xx = np.mgrid[0:ch, 0:cw]
    disc = (((yy - ch / 2) / (ch / 2)) ** 2 + ((xx - cw / 2) / (cw / 2)) ** 2 <= 1)[..., None]
    h, w = SIZE
    out = []
    for k in range(COUNT):
        zoom = 1.0 + 0.006 * k
        crop_h, crop_w = round(photo.shape[0] * 0.6 / zoom), round(photo.shape[1] * 0.6 / zoom)
        top = (photo.shape[0] - crop_h) // 2
        left = round(photo.shape[1] * 0.1) + 3 * k
        frame = images.resize_to(photo[top: top + crop_h, left: left + crop_w], h, w)
        y, x = 60 + 2 * k, 10 + 6 * k
        region = frame[y: y + ch, x: x + cw]
        frame[y: y + ch, x: x + cw] = np.where(disc[: region.shape[0], : region.shape[1]],
                                               cat[: region.shape[0], : region.shape[1]], region)
        out.append(frame)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=EXAMPLES / "tubingen_pan.mp4")
    a = p.parse_args()
    frames.write_video(a.out, clip(), FPS)
    print(a.out, a.out.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
