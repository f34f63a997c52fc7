"""The normalised VGG19 (``model.normalize``), as Gatys et al. used it.

Gatys, Ecker & Bethge 2016 (§2): "We normalized the network by scaling the
weights such that the mean activation of each convolutional filter over images
and positions is equal to one. Such re-scaling can be done for the VGG network
without changing its output, because it contains only rectifying linear
activation functions and no normalization or pooling over feature maps."

With μ_l,o the mean post-ReLU activation of filter o of convolution l in the
original network (over the positions of each image, then over the images) and
μ_0 = 1 for the input's channels, each convolution is rescaled bottom-up:

    W′_l[:, :, i, o] = W_l[:, :, i, o] · μ_{l−1,i} / μ_l,o,   b′_l[o] = b_l[o] / μ_l,o

Each convolution's input channel i is then 1/μ_{l−1,i} times the original's
(ReLU and pooling, max or average, commute with a positive per-channel
scale), the factor μ_{l−1,i} undoes it, so its pre-activations are the
original's divided by μ_l,o: the mean of each ReLU output is 1 and every
activation is the original's divided by its filter's mean. A filter that is
never active (μ = 0) is left as it is. The means depend on the weights, the
pooling, the images and their size: they are computed once, on every image in
``model.normalize_images`` (default: examples/) resized to longest side
``model.normalize_size``, and cached in the cache dir under a key of (the
weights' sha256, the pooling and its mode, the images' names and sha256s, the size).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nstjax import images
from nstjax.atomic import write_text
from nstjax.errors import UserError
from nstjax.vgg import VGG

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


def relu_layers(conv_layers: Sequence[str]) -> tuple[str, ...]:
    """The ReLU after each convolution."""
    return tuple("relu" + name[4:] for name in conv_layers)


def image_files(folder: str | Path) -> list[Path]:
    """The image files of ``folder``, sorted by name; none is an error naming model.normalize_images."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise UserError(f"model.normalize_images = {folder}: no image files there "
                        f"({', '.join(IMAGE_SUFFIXES)}); give a folder of images")
    return files


def filter_means(model: VGG, params: dict, imgs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """μ_l per ReLU layer (one value per filter): each image's mean over positions, averaged
    over the images, in the network ``model`` with ``params``."""
    relus = relu_layers(model.architecture.conv_layers)
    fn = jax.jit(lambda p, x: {k: jnp.mean(v[0], axis=(0, 1)) for k, v in model.apply({"params": p}, x[None],
                                                                                        relus).items()})
    total = {name: 0.0 for name in relus}
    for img in imgs:
        means = jax.device_get(fn(params, jnp.asarray(img, jnp.float32)))
        total = {name: total[name] + np.asarray(means[name], np.float64) for name in relus}
    return {name: total[name] / len(imgs) for name in relus}


def rescale(params: dict, means: dict[str, np.ndarray]) -> dict:
    """W′ = W · μ_in / μ_out and b′ = b / μ_out per convolution (μ = 0 taken as 1), in forward order."""
    out, previous = {}, np.ones(3)
    convs = sorted(params, key=lambda name: (int(name[4]), int(name[6:])))
    for conv, relu in zip(convs, relu_layers(convs)):
        mu = np.where(means[relu] > 0, means[relu], 1.0)
        kernel = np.asarray(params[conv]["kernel"], np.float64) * previous[:, None] / mu
        bias = np.asarray(params[conv]["bias"], np.float64) / mu
        out[conv] = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
        previous = mu
    return out


def cache_key(weights_sha256: str, pooling: str, files: Sequence[Path], size: int) -> str:
    """sha256 of (weights, pooling, each image's name and sha256, size)."""
    h = hashlib.sha256(json.dumps([weights_sha256, pooling, size]).encode())
    for f in files:
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def normalized_params(model: VGG, params: dict, weights_sha256: str, folder: str | Path, size: int,
                      cache: Path, max_pixels: int | None = None) -> dict:
    """``params`` of the normalised network: the filter means from ``cache`` when it holds them
    for this key, else computed on the images of ``folder`` (longest side ``size``) and cached."""
    files = image_files(folder)
    pooling = model.pooling + ("-ceil" if model.ceil_mode else "")
    path = Path(cache) / "normalize" / f"{cache_key(weights_sha256, pooling, files, size)}.json"
    if path.is_file():
        means = {k: np.asarray(v, np.float64) for k, v in json.loads(path.read_text()).items()}
    else:
        imgs = [images.resize_longest(images.load_image(f, max_pixels), size) for f in files]
        means = filter_means(model, params, imgs)
        write_text(path, json.dumps({k: v.tolist() for k, v in means.items()}))
    return rescale(params, means)
