"""VGG weights files (VGG11, 13, 16, 19): reading the formats, writing the canonical one.

Three key layouts are recognised, in any container:

    keras        block{b}_conv{i}/block{b}_conv{i}_W_1:0 (HWIO) and ..._b_1:0
    torchvision  features.{0,2,5,...}.weight (OIHW) and .bias; other keys ignored
    canonical    conv{b}_{i}/kernel (HWIO) and conv{b}_{i}/bias

and a fourth container, ONNX (:mod:`nstjax.weights.onnx_graph`): the Conv
nodes in graph order. The architecture is recognised from the convolutions a
file holds (:data:`nstjax.vgg.ARCHITECTURES`: their count in torchvision's and
ONNX's numbering, their names in the others) and recorded in
:attr:`VGGWeights.arch`.

The canonical file is safetensors with the conv tensors only (HWIO float32)
and metadata: format, arch, preprocessing (JSON), source, origin_sha256.

Files are untrusted: one larger than VGG weights can be is refused unread,
the shapes each container declares (safetensors' header, parsed here with
bounds before the library sees the file; HDF5 datasets; npy headers; ONNX
initializers) are checked against the network's before any tensor is read,
and pickles are only read by ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import h5py
import numpy as np
import safetensors
import safetensors.numpy

from nstjax.atomic import atomic_path
from nstjax.errors import UserError
from nstjax.vgg import ARCHITECTURES, CAFFE, DEFAULT_ARCH, TORCHVISION, Architecture, Preprocessing

SUFFIXES = (".h5", ".safetensors", ".npz", ".pth", ".onnx")
CANONICAL_FORMAT = "nstjax-{arch}"
"""The canonical file's ``format`` metadata, e.g. nstjax-vgg19."""
_NPZ_METADATA = "metadata."
MAX_FILE_BYTES = 2 << 30  # VGG19 with its classifier is 575 MB in float32, 1.15 GB in float64
MAX_HEADER_BYTES = 16 << 20  # a safetensors header of VGG19 is a few kB
_UNREADABLE = (OSError, ValueError, RuntimeError, EOFError, KeyError, zipfile.BadZipFile,
               pickle.UnpicklingError, safetensors.SafetensorError)


class WeightsError(UserError):
    """A weights file or name that can't be used; the message says what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


@dataclasses.dataclass(frozen=True)
class VGGWeights:
    """The params of :class:`nstjax.vgg.VGG` and the preprocessing they expect.

    ``params`` is ``{conv1_1: {kernel: (3, 3, in, out) float32, bias: (out,)}, ...}``;
    ``source`` the registry name or file path; ``sha256`` that of the file read; ``arch``
    the network the convolutions make (:data:`nstjax.vgg.ARCHITECTURES`).
    """

    params: dict
    preprocessing: Preprocessing
    source: str
    sha256: str
    arch: str = DEFAULT_ARCH


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """What a file holds; ``preprocessing`` is None where neither metadata nor layout says."""

    path: Path
    layout: str
    params: dict
    preprocessing: Preprocessing | None
    metadata: dict[str, str]
    sha256: str
    arch: str = DEFAULT_ARCH


def torchvision_indices(arch: Architecture) -> tuple[int, ...]:
    """The index of each convolution in torchvision's ``features`` (a Conv2d and a ReLU per
    convolution, a MaxPool2d after each block: torchvision.models.vgg.make_layers)."""
    indices, i = [], 0
    for n in arch.block_sizes:
        for _ in range(n):
            indices.append(i)
            i += 2
        i += 1
    return tuple(indices)


@functools.cache
def layout_keys(arch_name: str = DEFAULT_ARCH) -> dict[str, dict[str, tuple[str, str]]]:
    """Per layout, the (kernel, bias) keys of each convolution of the network ``arch_name``."""
    arch = ARCHITECTURES[arch_name]
    keys: dict[str, dict[str, tuple[str, str]]] = {"keras": {}, "torchvision": {}, "canonical": {}}
    for index, name in zip(torchvision_indices(arch), arch.conv_layers):
        group = f"block{name[4]}_conv{name[6:]}"
        keys["keras"][name] = (f"{group}/{group}_W_1:0", f"{group}/{group}_b_1:0")
        keys["torchvision"][name] = (f"features.{index}.weight", f"features.{index}.bias")
        keys["canonical"][name] = (f"{name}/kernel", f"{name}/bias")
    return keys


_LAYOUT_PREPROCESSING = {"keras": CAFFE, "torchvision": TORCHVISION, "canonical": None, "onnx": None}


def arch_of_count(count: int) -> Architecture | None:
    """The architecture with ``count`` convolutions (8, 10, 13 or 16), if any."""
    return next((a for a in ARCHITECTURES.values() if len(a.conv_layers) == count), None)


def _closest_arch(names: set[str], layout: str) -> tuple[Architecture, int]:
    """The architecture most of whose kernels ``names`` holds (of two with as many, the one
    missing fewer), and how many it holds."""
    def score(arch):
        kernels = [k for k, _ in layout_keys(arch.name)[layout].values()]
        held = sum(k in names for k in kernels)
        return held, held - len(kernels)

    arch = max(ARCHITECTURES.values(), key=score)
    return arch, score(arch)[0]


def file_hash(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _detect_layout(path: Path, names: set[str]) -> tuple[str, Architecture]:
    """The layout of ``names`` and the architecture its convolutions make (the one of which it
    holds the most kernels; a file that lacks some is refused later, naming them)."""
    found = {layout: _closest_arch(names, layout) for layout in ("keras", "torchvision", "canonical")}
    layout = max(found, key=lambda k: found[k][1])
    if found[layout][1] == 0:
        shown = ", ".join(sorted(names)[:4]) or "no tensors"
        raise WeightsError(
            f"{path} holds no VGG conv weights in a known layout (found {shown}); expected "
            f"keys like 'block1_conv1/block1_conv1_W_1:0' (Keras), 'features.0.weight' "
            f"(torchvision) or 'conv1_1/kernel' (nstjax): use a VGG weights file")
    return layout, found[layout][0]


def _declared_layout(path: Path, names: Iterable[str], shape_of: Callable[[str], tuple]) -> tuple[str, Architecture]:
    """The layout of ``names`` and its architecture, once every convolution is there with the
    shapes the network needs as the file declares them (``shape_of``): checked before any
    tensor is read."""
    names = set(names)
    layout, arch = _detect_layout(path, names)
    for name, keys in layout_keys(arch.name)[layout].items():
        missing = [k for k in keys if k not in names]
        if missing:
            raise WeightsError(
                f"{path} has no {name} (no {missing[0]!r}): it is not a complete {arch.name.upper()} "
                f"({layout} layout); use a file with all {len(arch.conv_layers)} convolutions")
        for key, part, shape in zip(keys, ("kernel", "bias"), arch.conv_shapes()[name]):
            _check_shape(path, name, part, _as_hwio(layout, part, tuple(shape_of(key))), shape, arch)
    return layout, arch


def _extract(path: Path, layout: str, arch: Architecture, get: Callable[[str], np.ndarray]) -> dict:
    """The convolutions of ``arch`` from a file in ``layout`` read with ``get``, checked."""
    shapes = arch.conv_shapes()
    params = {}
    for name, keys in layout_keys(arch.name)[layout].items():
        kernel, bias = (_float32(path, key, get(key)) for key in keys)
        if layout == "torchvision" and kernel.ndim == 4:
            kernel = kernel.transpose(2, 3, 1, 0)
        for part, array, shape in (("kernel", kernel, shapes[name][0]), ("bias", bias, shapes[name][1])):
            _check(path, name, part, array, shape, arch)
        params[name] = {"kernel": np.ascontiguousarray(kernel), "bias": np.ascontiguousarray(bias)}
    return params


def _float32(path: Path, key: str, array) -> np.ndarray:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise WeightsError(f"{path}: tensor {key!r} has dtype {array.dtype}, not floating point: "
                           "use a VGG weights file")
    return array.astype(np.float32, copy=False)


def _as_hwio(layout: str, part: str, shape: tuple) -> tuple:
    """A declared torchvision kernel shape (OIHW) as the HWIO shape it becomes."""
    if layout == "torchvision" and part == "kernel" and len(shape) == 4:
        return shape[2], shape[3], shape[1], shape[0]
    return shape


def _check_shape(where, name: str, part: str, shape: tuple, want: tuple, arch: Architecture) -> None:
    if tuple(shape) != tuple(want):
        layout = " (HWIO)" if part == "kernel" else ""
        net = arch.name.upper()
        raise WeightsError(f"{where}: {name} {part} has shape {tuple(shape)}, {net} needs "
                           f"{tuple(want)}{layout}: this is not {net} weights, use a VGG weights file")


def _check(where, name: str, part: str, array: np.ndarray, shape: tuple, arch: Architecture) -> None:
    _check_shape(where, name, part, array.shape, shape, arch)
    if not np.isfinite(array).all():
        raise WeightsError(f"{where}: {name} {part} has NaN or infinite values: the file is "
                           "corrupt, download or convert it again")


def _read_h5(path: Path) -> tuple[str, dict, dict]:
    with h5py.File(path, "r") as f:
        names = []
        f.visititems(lambda key, obj: names.append(key) if isinstance(obj, h5py.Dataset) else None)
        layout, arch = _declared_layout(path, names, lambda key: f[key].shape)
        return layout, arch, _extract(path, layout, arch, lambda key: f[key][()]), {}


def _safetensors_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensors (``{key: {dtype, shape, data_offsets}}``) and metadata a safetensors
    file declares, parsed and bounds-checked without the safetensors library."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _unreadable(path, "a safetensors", "shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise _unreadable(path, "a safetensors", f"it declares a {length:,}-byte header, the "
                              f"file has {size:,} bytes")
        if length > MAX_HEADER_BYTES:
            raise WeightsError(f"{path} declares a {length:,}-byte safetensors header, more than "
                               f"the {MAX_HEADER_BYTES >> 20} MiB a weights file needs; nothing "
                               "was read: this is not VGG weights, use a VGG weights file")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise ValueError("malformed __metadata__")
    data_size = size - 8 - length
    for key, entry in header.items():
        shape, offsets = (entry.get(k) if isinstance(entry, dict) else None
                          for k in ("shape", "data_offsets"))
        if not (_ints(shape) and _ints(offsets) and len(offsets) == 2
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise ValueError(f"tensor {key!r}: malformed entry or data past the end of the file")
    return header, metadata


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)


def _read_safetensors(path: Path) -> tuple[str, Architecture, dict, dict]:
    tensors, metadata = _safetensors_header(path)
    layout, arch = _declared_layout(path, tensors, lambda key: tensors[key]["shape"])
    with safetensors.safe_open(str(path), framework="numpy") as f:
        return layout, arch, _extract(path, layout, arch, f.get_tensor), metadata


def _npy_shapes(path: Path) -> dict[str, tuple]:
    """The shape each array of an .npz declares in its npy header (nothing else is read)."""
    shapes = {}
    with zipfile.ZipFile(path) as z:
        for member in z.namelist():
            if member.endswith(".npy"):
                with z.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shapes[member[:-len(".npy")]] = read_header(f)[0]
    return shapes


def _read_npz(path: Path) -> tuple[str, Architecture, dict, dict]:
    if not zipfile.is_zipfile(path):
        raise _unreadable(path, "an npz", "not a zip archive")
    shapes = _npy_shapes(path)
    layout, arch = _declared_layout(path, shapes, shapes.__getitem__)
    with np.load(path, allow_pickle=False) as z:
        metadata = {k[len(_NPZ_METADATA):]: str(z[k]) for k in z.files
                    if k.startswith(_NPZ_METADATA) and shapes.get(k) == ()}
        return layout, arch, _extract(path, layout, arch, z.__getitem__), metadata


def _read_pth(path: Path) -> tuple[str, Architecture, dict, dict]:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"reading {path} (a PyTorch .pth file) needs torch: "
                           "pip install 'nstjax[torch]', or convert the file to .safetensors") from None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        if re.search(r"Unsupported (global|class)", str(e)):
            raise WeightsError(f"{path} holds more than tensors (only a plain state dict is read, "
                               "nothing else is unpickled): save model.state_dict() and use that "
                               "file") from None
        raise _unreadable(path, "a PyTorch", "not a torch.save file") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict: "
                           "save model.state_dict() and use that file")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    layout, arch = _declared_layout(path, tensors, lambda key: tensors[key].shape)
    return layout, arch, _extract(path, layout, arch, lambda key: tensors[key].detach().float().numpy()), {}


def _read_onnx(path: Path) -> tuple[str, Architecture, dict, dict]:
    from nstjax.weights import onnx_graph

    convs = onnx_graph.read_convs(path)
    arch = arch_of_count(len(convs))
    if arch is None:
        raise WeightsError(
            f"{path} has {len(convs)} Conv nodes, which make none of "
            f"{', '.join(a.name.upper() for a in ARCHITECTURES.values())} (8, 10, 13 or 16 "
            "3×3 convolutions): it is not a VGG conv base; use the ONNX export of a VGG network")
    for name, conv in zip(arch.conv_layers, convs):
        for part, shape, want in (("kernel", conv.kernel_shape_hwio, arch.conv_shapes()[name][0]),
                                  ("bias", conv.bias_shape, arch.conv_shapes()[name][1])):
            _check_shape(f"{path} (Conv node {conv.node!r})", name, part, shape, want, arch)
    params = {}
    for name, conv in zip(arch.conv_layers, convs):
        kernel, bias = conv.read()
        params[name] = {"kernel": np.ascontiguousarray(_float32(path, conv.node, kernel).transpose(2, 3, 1, 0)),
                        "bias": np.ascontiguousarray(_float32(path, conv.node, bias))}
        for part in ("kernel", "bias"):
            _check(path, name, part, params[name][part], arch.conv_shapes()[name][part == "bias"], arch)
    return "onnx", arch, params, {}


_READERS = {".h5": (_read_h5, "an HDF5"), ".safetensors": (_read_safetensors, "a safetensors"),
            ".npz": (_read_npz, "an npz"), ".pth": (_read_pth, "a PyTorch"), ".onnx": (_read_onnx, "an ONNX")}


def _unreadable(path: Path, kind: str, reason: str) -> WeightsError:
    return WeightsError(f"cannot read {path} as {kind} file ({reason}): it is corrupt or "
                        "truncated; download or convert it again")


def _preprocessing_of(path: Path, layout: str, metadata: dict[str, str]) -> Preprocessing | None:
    if "preprocessing" not in metadata:
        return _LAYOUT_PREPROCESSING[layout]
    try:
        return Preprocessing(**json.loads(metadata["preprocessing"]))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path}: invalid preprocessing metadata ({e}): convert the original "
                           "file again, or pass the preprocessing explicitly") from None


def read_file(path: str | Path) -> WeightsFile:
    """Read and check a .h5, .safetensors, .npz, .pth or .onnx file."""
    path = Path(path)
    if path.suffix not in _READERS:
        raise WeightsError(f"{path}: unknown weights file extension {path.suffix!r}; "
                           f"use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise WeightsError(f"no such weights file: {path}; give the path of an existing file, "
                           "or a registry name (see python -m nstjax.weights list)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise WeightsError(f"{path} is {size / 2**30:.1f} GiB, far larger than VGG weights can "
                           f"be (at most {MAX_FILE_BYTES >> 30} GiB); nothing was read: use a "
                           "VGG weights file")
    reader, kind = _READERS[path.suffix]
    try:
        layout, arch, params, metadata = reader(path)
    except WeightsError:
        raise
    except _UNREADABLE as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise _unreadable(path, kind, reason) from None
    return WeightsFile(path, layout, params, _preprocessing_of(path, layout, metadata),
                       metadata, file_hash(path), arch.name)


def read_weights(path: str | Path, preprocessing: Preprocessing | None = None,
                 source: str | None = None) -> VGGWeights:
    """The weights of a file; ``preprocessing`` overrides what the file says or implies."""
    f = read_file(path)
    preprocessing = preprocessing or f.preprocessing
    if preprocessing is None:
        raise WeightsError(
            f"{path} does not say which preprocessing its weights expect: set "
            "model.preprocessing.channel_order, .scale, .mean and .std (a Keras or Caffe export: "
            "channel_order=BGR, scale=255, mean=[103.939,116.779,123.68]; torchvision's: RGB, 1, "
            "the ImageNet mean and std), or store it in the file with python -m nstjax.weights "
            "convert --preprocessing caffe|torchvision")
    return VGGWeights(f.params, preprocessing, str(path) if source is None else source, f.sha256, f.arch)


def _canonical_arrays(weights: VGGWeights) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    arch = ARCHITECTURES[weights.arch]
    shapes = arch.conv_shapes()
    if set(weights.params) != set(arch.conv_layers):
        raise WeightsError(f"weights from {weights.source} do not have exactly the "
                           f"{len(arch.conv_layers)} {arch.name.upper()} convolutions: pass complete "
                           f"{arch.name.upper()} params")
    arrays = {}
    for name, (kernel_key, bias_key) in layout_keys(arch.name)["canonical"].items():
        for key, part, shape in ((kernel_key, "kernel", shapes[name][0]),
                                 (bias_key, "bias", shapes[name][1])):
            array = np.ascontiguousarray(weights.params[name][part], dtype=np.float32)
            _check(weights.source, name, part, array, shape, arch)
            arrays[key] = array
    metadata = {"format": CANONICAL_FORMAT.format(arch=arch.name),
                "preprocessing": json.dumps(weights.preprocessing.to_dict()),
                "source": weights.source, "origin_sha256": weights.sha256}
    return arrays, metadata


def save_canonical(path: str | Path, weights: VGGWeights) -> None:
    """Write the canonical file: conv tensors (HWIO float32) and metadata, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"{path}: the canonical weights file must end in .safetensors")
    arrays, metadata = _canonical_arrays(weights)
    with atomic_path(path) as tmp:
        safetensors.numpy.save_file(arrays, str(tmp), metadata=metadata)


def save_npz(path: str | Path, weights: VGGWeights) -> None:
    """Write the canonical tensors and metadata (as ``metadata.*`` strings) to an .npz, atomically."""
    arrays, metadata = _canonical_arrays(weights)
    arrays.update({_NPZ_METADATA + k: np.array(v) for k, v in metadata.items()})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
