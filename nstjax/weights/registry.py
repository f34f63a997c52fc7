"""The named weight sources: where each file comes from and what it expects."""

from __future__ import annotations

import dataclasses
import os
import re

from nstjax.vgg import CAFFE, TORCHVISION, Preprocessing
from nstjax.weights.formats import SUFFIXES, WeightsError

DEFAULT = "vgg19"


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """A downloadable VGG19 weights file.

    ``known_hash`` is pooch's ``"md5:..."``/``"sha256:..."``; ``size`` is in
    bytes, or None where only the hash is known (the hash is what's verified);
    ``approx_size`` is for display.
    """

    name: str
    url: str
    filename: str
    size: int | None
    approx_size: int
    known_hash: str
    file_format: str
    preprocessing: Preprocessing
    licence: str
    description: str

    @property
    def canonical_filename(self) -> str:
        """Name of the converted file in the cache dir."""
        return f"{self.name}.safetensors"

    @property
    def url_variable(self) -> str:
        """Environment variable that overrides the URL (a mirror; the hash still applies)."""
        return "NSTJAX_WEIGHTS_URL_" + re.sub(r"[^A-Z0-9]", "_", self.name.upper())

    def download_url(self) -> str:
        return os.environ.get(self.url_variable) or self.url

    def describe_file(self) -> str:
        """'filename (N bytes, md5 ...)' for messages."""
        size = f"{self.size:,} bytes, " if self.size else ""
        algorithm, digest = self.known_hash.split(":")
        return f"{self.filename} ({size}{algorithm} {digest})"


SOURCES: dict[str, WeightSource] = {
    s.name: s
    for s in (
        WeightSource(
            name="vgg19",
            url="https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
                "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            filename="vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
            size=80_134_624,
            approx_size=80_134_624,
            known_hash="md5:253f8cb515780f3b799900260a226db6",
            file_format="Keras HDF5 (conv layers only)",
            preprocessing=CAFFE,
            licence="CC BY 4.0",
            description="the original Oxford VGG19 (Caffe), as used by Gatys et al.",
        ),
        WeightSource(
            name="vgg19-torchvision",
            url="https://huggingface.co/timm/vgg19.tv_in1k/resolve/main/model.safetensors",
            filename="model.safetensors",
            size=None,
            approx_size=574_700_000,
            known_hash="sha256:11aea017b543ff59233749d8f1cf544cda749378f5790d2fedab841fb86b7669",
            file_format="safetensors (timm/torchvision layout)",
            preprocessing=TORCHVISION,
            licence="BSD-3-Clause",
            description="torchvision's IMAGENET1K_V1, as timm publishes it (timm/vgg19.tv_in1k)",
        ),
    )
}


def get_source(name: str) -> WeightSource:
    """The registry entry ``name``, or an error listing the valid names."""
    if name not in SOURCES:
        raise WeightsError(
            f"unknown weights {name!r}: use one of {', '.join(SOURCES)} (see python -m "
            f"nstjax.weights list), or the path of a {', '.join(SUFFIXES)} weights file")
    return SOURCES[name]
