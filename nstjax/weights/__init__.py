"""VGG19 weights: named downloadable sources, local files, one canonical file.

    load_weights("vgg19")              downloaded on first use, then read from the cache
    load_weights("path/to/file.h5")    a local .h5, .safetensors, .npz or .pth file

The result's ``params`` are exactly those of :class:`nstjax.vgg.VGG19`.
"""

from __future__ import annotations

import os
from pathlib import Path

from nstjax.vgg import Preprocessing
from nstjax.weights.download import cache_dir, cached_path, fetch, fetch_source
from nstjax.weights.formats import (SUFFIXES, VGGWeights, WeightsError, read_file, read_weights,
                                    save_canonical, save_npz)
from nstjax.weights.registry import DEFAULT, SOURCES, WeightSource, get_source

__all__ = [
    "DEFAULT", "SOURCES", "SUFFIXES", "VGGWeights", "WeightSource", "WeightsError", "cache_dir",
    "cached_path", "fetch", "fetch_source", "load_weights", "read_file", "resolve", "save_canonical",
    "save_npz",
]


def resolve(name_or_path: str | os.PathLike) -> tuple[Path, str]:
    """The file to read for a registry name (fetched) or a path, and the source to record."""
    text = os.fspath(name_or_path)
    if text in SOURCES:
        return fetch(text), text
    path = Path(text)
    if not (path.suffix or path.exists() or "/" in text or os.sep in text):
        get_source(text)  # not a registry name: raises, listing the valid names
    return path, text


def load_weights(name_or_path: str | os.PathLike = DEFAULT,
                 preprocessing: Preprocessing | None = None) -> VGGWeights:
    """Weights from a registry name (downloaded once, then cached) or a local file.

    ``preprocessing`` overrides what the file's metadata or key layout implies.
    """
    path, source = resolve(name_or_path)
    return read_weights(path, preprocessing, source)
