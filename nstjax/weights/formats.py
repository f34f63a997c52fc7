"""VGG19 weights files: reading the four formats, writing the canonical one.

Three key layouts are recognised, in any container:

    keras        block{b}_conv{i}/block{b}_conv{i}_W_1:0 (HWIO) and ..._b_1:0
    torchvision  features.{0,2,5,...,34}.weight (OIHW) and .bias; other keys ignored
    canonical    conv{b}_{i}/kernel (HWIO) and conv{b}_{i}/bias

The canonical file is safetensors with the conv tensors only (HWIO float32)
and metadata: format, preprocessing (JSON), source, origin_sha256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import h5py
import numpy as np
import safetensors
import safetensors.numpy

from nstjax.atomic import atomic_path
from nstjax.errors import UserError
from nstjax.vgg import CAFFE, CONV_LAYERS, TORCHVISION, Preprocessing, conv_shapes

SUFFIXES = (".h5", ".safetensors", ".npz", ".pth")
CANONICAL_FORMAT = "nstjax-vgg19"
_NPZ_METADATA = "metadata."
_TORCHVISION_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)
_UNREADABLE = (OSError, ValueError, RuntimeError, EOFError, KeyError, zipfile.BadZipFile,
               pickle.UnpicklingError, safetensors.SafetensorError)


class WeightsError(UserError):
    """A weights file or name that can't be used; the message says what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


@dataclasses.dataclass(frozen=True)
class VGGWeights:
    """The params of :class:`nstjax.vgg.VGG19` and the preprocessing they expect.

    ``params`` is ``{conv1_1: {kernel: (3, 3, in, out) float32, bias: (out,)}, ...}``;
    ``source`` the registry name or file path; ``sha256`` that of the file read.
    """

    params: dict
    preprocessing: Preprocessing
    source: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """What a file holds; ``preprocessing`` is None where neither metadata nor layout says."""

    path: Path
    layout: str
    params: dict
    preprocessing: Preprocessing | None
    metadata: dict[str, str]
    sha256: str


def _layout_keys() -> dict[str, dict[str, tuple[str, str]]]:
    keys: dict[str, dict[str, tuple[str, str]]] = {"keras": {}, "torchvision": {}, "canonical": {}}
    for index, name in zip(_TORCHVISION_INDICES, CONV_LAYERS):
        group = f"block{name[4]}_conv{name[6]}"
        keys["keras"][name] = (f"{group}/{group}_W_1:0", f"{group}/{group}_b_1:0")
        keys["torchvision"][name] = (f"features.{index}.weight", f"features.{index}.bias")
        keys["canonical"][name] = (f"{name}/kernel", f"{name}/bias")
    return keys


LAYOUT_KEYS = _layout_keys()
_LAYOUT_PREPROCESSING = {"keras": CAFFE, "torchvision": TORCHVISION, "canonical": None}


def file_hash(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _detect_layout(path: Path, names: set[str]) -> str:
    counts = {layout: sum(k in names for pair in keys.values() for k in pair)
              for layout, keys in LAYOUT_KEYS.items()}
    layout = max(counts, key=counts.get)
    if counts[layout] == 0:
        found = ", ".join(sorted(names)[:4]) or "no tensors"
        raise WeightsError(
            f"{path} holds no VGG19 conv weights in a known layout (found {found}); expected "
            f"keys like 'block1_conv1/block1_conv1_W_1:0' (Keras), 'features.0.weight' "
            f"(torchvision) or 'conv1_1/kernel' (nstjax): use a VGG19 weights file")
    return layout


def _extract(path: Path, names: Iterable[str], get: Callable[[str], np.ndarray]) -> tuple[str, dict]:
    """The layout of ``names`` and the 16 convolutions read with ``get``, checked."""
    names = set(names)
    layout = _detect_layout(path, names)
    shapes = conv_shapes()
    params = {}
    for name, keys in LAYOUT_KEYS[layout].items():
        missing = [k for k in keys if k not in names]
        if missing:
            raise WeightsError(
                f"{path} has no {name} (no {missing[0]!r}): it is not a complete VGG19 "
                f"({layout} layout); use a file with all 16 convolutions of VGG19")
        kernel, bias = (_float32(path, key, get(key)) for key in keys)
        if layout == "torchvision" and kernel.ndim == 4:
            kernel = kernel.transpose(2, 3, 1, 0)
        for part, array, shape in (("kernel", kernel, shapes[name][0]), ("bias", bias, shapes[name][1])):
            _check(path, name, part, array, shape)
        params[name] = {"kernel": np.ascontiguousarray(kernel), "bias": np.ascontiguousarray(bias)}
    return layout, params


def _float32(path: Path, key: str, array) -> np.ndarray:
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise WeightsError(f"{path}: tensor {key!r} has dtype {array.dtype}, not floating point: "
                           "use a VGG19 weights file")
    return array.astype(np.float32, copy=False)


def _check(where, name: str, part: str, array: np.ndarray, shape: tuple) -> None:
    if tuple(array.shape) != tuple(shape):
        layout = " (HWIO)" if part == "kernel" else ""
        raise WeightsError(f"{where}: {name} {part} has shape {tuple(array.shape)}, VGG19 needs "
                           f"{tuple(shape)}{layout}: this is not VGG19 weights, use a VGG19 file")
    if not np.isfinite(array).all():
        raise WeightsError(f"{where}: {name} {part} has NaN or infinite values: the file is "
                           "corrupt, download or convert it again")


def _read_h5(path: Path) -> tuple[str, dict, dict]:
    with h5py.File(path, "r") as f:
        names = []
        f.visititems(lambda key, obj: names.append(key) if isinstance(obj, h5py.Dataset) else None)
        return *_extract(path, names, lambda key: f[key][()]), {}


def _read_safetensors(path: Path) -> tuple[str, dict, dict]:
    with safetensors.safe_open(str(path), framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        return *_extract(path, f.keys(), f.get_tensor), metadata


def _read_npz(path: Path) -> tuple[str, dict, dict]:
    if not zipfile.is_zipfile(path):
        raise _unreadable(path, "an npz", "not a zip archive")
    with np.load(path, allow_pickle=False) as z:
        metadata = {k[len(_NPZ_METADATA):]: str(z[k]) for k in z.files if k.startswith(_NPZ_METADATA)}
        return *_extract(path, z.files, z.__getitem__), metadata


def _read_pth(path: Path) -> tuple[str, dict, dict]:
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
    layout, params = _extract(path, tensors, lambda key: tensors[key].detach().float().numpy())
    return layout, params, {}


_READERS = {".h5": (_read_h5, "an HDF5"), ".safetensors": (_read_safetensors, "a safetensors"),
            ".npz": (_read_npz, "an npz"), ".pth": (_read_pth, "a PyTorch")}


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
    """Read and check a .h5, .safetensors, .npz or .pth file."""
    path = Path(path)
    if path.suffix not in _READERS:
        raise WeightsError(f"{path}: unknown weights file extension {path.suffix!r}; "
                           f"use one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise WeightsError(f"no such weights file: {path}; give the path of an existing file, "
                           "or a registry name (see python -m nstjax.weights list)")
    reader, kind = _READERS[path.suffix]
    try:
        layout, params, metadata = reader(path)
    except WeightsError:
        raise
    except _UNREADABLE as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise _unreadable(path, kind, reason) from None
    return WeightsFile(path, layout, params, _preprocessing_of(path, layout, metadata),
                       metadata, file_hash(path))


def read_weights(path: str | Path, preprocessing: Preprocessing | None = None,
                 source: str | None = None) -> VGGWeights:
    """The weights of a file; ``preprocessing`` overrides what the file says or implies."""
    f = read_file(path)
    preprocessing = preprocessing or f.preprocessing
    if preprocessing is None:
        raise WeightsError(
            f"{path} does not say which preprocessing its weights expect: pass it explicitly "
            "(model.preprocessing in the config, or python -m nstjax.weights convert "
            "--preprocessing caffe|torchvision to store it in the file)")
    return VGGWeights(f.params, preprocessing, str(path) if source is None else source, f.sha256)


def _canonical_arrays(weights: VGGWeights) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    shapes = conv_shapes()
    if set(weights.params) != set(CONV_LAYERS):
        raise WeightsError(f"weights from {weights.source} do not have exactly the 16 VGG19 "
                           "convolutions: pass complete VGG19 params")
    arrays = {}
    for name, (kernel_key, bias_key) in LAYOUT_KEYS["canonical"].items():
        for key, part, shape in ((kernel_key, "kernel", shapes[name][0]),
                                 (bias_key, "bias", shapes[name][1])):
            array = np.ascontiguousarray(weights.params[name][part], dtype=np.float32)
            _check(weights.source, name, part, array, shape)
            arrays[key] = array
    metadata = {"format": CANONICAL_FORMAT, "preprocessing": json.dumps(weights.preprocessing.to_dict()),
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
