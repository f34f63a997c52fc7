"""The named weight sources: where each file comes from and what it expects."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

from nstjax.vgg import CAFFE, DEFAULT_ARCH, TORCHVISION, Preprocessing
from nstjax.weights.formats import SUFFIXES, WeightsError

DEFAULT = "vgg19"


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """A downloadable VGG weights file (``arch``: the network, :data:`nstjax.vgg.ARCHITECTURES`).

    ``known_hash`` is ``"md5:..."`` or ``"sha256:..."`` (pooch's spelling): the
    whole digest, or a prefix of it (at least 8 hex digits) where that is all
    the publisher pins, as torchvision does in its file names (torch.hub's
    ``check_hash``: the file's sha256 must start with it). ``size`` is in bytes,
    or None where only the hash is known; ``approx_size`` is for display.
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
    arch: str = DEFAULT_ARCH

    def __post_init__(self):
        algorithm, _, digest = self.known_hash.partition(":")
        full = 2 * hashlib.new(algorithm).digest_size if algorithm in ("md5", "sha256") else 0
        if not (full and re.fullmatch(r"[0-9a-f]{8,%d}" % full, digest)):
            raise ValueError(f"{self.name}: known_hash {self.known_hash!r} is not 'md5:HEX' or "
                             "'sha256:HEX' with 8 or more lowercase hex digits")

    @property
    def hash_algorithm(self) -> str:
        return self.known_hash.split(":")[0]

    @property
    def hash_digest(self) -> str:
        """The pinned digest, or the prefix of it that is pinned."""
        return self.known_hash.split(":")[1]

    @property
    def check(self) -> str:
        """What a download is checked against: 'md5 full', 'sha256 full' or 'sha256 prefix'."""
        full = len(self.hash_digest) == 2 * hashlib.new(self.hash_algorithm).digest_size
        return f"{self.hash_algorithm} {'full' if full else 'prefix'}"

    def hash_matches(self, digest: str) -> bool:
        """Whether a file with hex ``digest`` (of ``hash_algorithm``) is this source's file."""
        return digest.lower().startswith(self.hash_digest)

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
        prefix = " starting" if self.check.endswith("prefix") else ""
        return f"{self.filename} ({size}{self.hash_algorithm}{prefix} {self.hash_digest})"


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
        WeightSource(
            name="vgg19-torchvision-pth",
            url="https://download.pytorch.org/models/vgg19-dcbb9e9d.pth",
            filename="vgg19-dcbb9e9d.pth",
            size=574_673_361,
            approx_size=574_673_361,
            known_hash="sha256:dcbb9e9d",  # the prefix in the file name, what torch.hub checks
            file_format="PyTorch state dict (needs torch)",
            preprocessing=TORCHVISION,
            licence="BSD-3-Clause",
            description="torchvision's IMAGENET1K_V1, torchvision's own file",
        ),
        WeightSource(
            name="vgg16",
            url="https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
                "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            filename="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            size=58_889_256,
            approx_size=58_889_256,
            known_hash="md5:6d6bbae143d832006294945121d1f1fc",  # keras/applications/vgg16.py
            file_format="Keras HDF5 (conv layers only)",
            preprocessing=CAFFE,
            licence="CC BY 4.0",
            description="the original Oxford VGG16 (Caffe), as Keras ships it",
            arch="vgg16",
        ),
        *(WeightSource(
            name=f"{arch}-torchvision-pth",
            url=f"https://download.pytorch.org/models/{arch}-{digest}.pth",
            filename=f"{arch}-{digest}.pth",
            size=size,
            approx_size=size or round(megabytes * 2**20),  # torchvision's _file_size (MiB)
            known_hash=f"sha256:{digest}",  # the prefix in the file name, what torch.hub checks
            file_format="PyTorch state dict (needs torch)",
            preprocessing=TORCHVISION,
            licence="BSD-3-Clause",
            description=f"torchvision's {arch.upper()}_Weights.IMAGENET1K_V1, torchvision's own file",
            arch=arch,
        ) for arch, digest, size, megabytes in (("vgg16", "397923af", 553_433_881, 527.796),
                                                ("vgg13", "19584684", None, 507.545),
                                                ("vgg11", "8a719046", None, 506.84))),
    )
}


def get_source(name: str) -> WeightSource:
    """The registry entry ``name``, or an error listing the valid names."""
    if name not in SOURCES:
        raise WeightsError(
            f"unknown weights {name!r}: use one of {', '.join(SOURCES)} (see python -m "
            f"nstjax.weights list), or the path of a {', '.join(SUFFIXES)} weights file")
    return SOURCES[name]
