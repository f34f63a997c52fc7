"""The convolutions of an ONNX graph (``model.weights=model.onnx``, extra ``nstjax[onnx]``).

An exported VGG (a Keras, PyTorch or TensorFlow model through tf2onnx or
torch.onnx) holds each convolution as a ``Conv`` node whose weight (OIHW) and
bias are initializers. :func:`read_convs` lists them in graph order, checking
each is a 3×3, stride 1, padding 1 convolution of one group with its tensors in
the file (external data is not read); anything else in the graph (the input
transpose of an NHWC export, poolings, a classifier head) is ignored. The
declared shapes are returned first, so that the caller checks them against the
network before a tensor is decoded. An ONNX file does not say how its input is
preprocessed: ``model.preprocessing`` must.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from nstjax.errors import UserError

_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64"}  # onnx.TensorProto.DataType


@dataclasses.dataclass(frozen=True)
class ConvNode:
    """One Conv node: its name, the shapes its initializers declare, and how to decode them."""

    node: str
    kernel_shape: tuple[int, ...]  # OIHW, as declared
    bias_shape: tuple[int, ...]
    read: Callable[[], tuple[np.ndarray, np.ndarray]]  # (kernel OIHW, bias)

    @property
    def kernel_shape_hwio(self) -> tuple[int, ...]:
        o, i, h, w = self.kernel_shape if len(self.kernel_shape) == 4 else (0, 0, 0, 0)
        return (h, w, i, o) if len(self.kernel_shape) == 4 else self.kernel_shape


def _not_vgg(path: Path, why: str) -> UserError:
    from nstjax.weights.formats import WeightsError

    return WeightsError(f"{path} is not a VGG conv base: {why}; use the ONNX export of a VGG network")


def _attributes(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _check_conv(path: Path, node) -> None:
    """A VGG convolution: 3×3, stride 1, one pixel of zero padding ('SAME'), one group, no dilation."""
    a = _attributes(node)
    pads = list(a.get("pads", [0, 0, 0, 0]))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    same = pads == [1, 1, 1, 1] or (auto in ("SAME_UPPER", "SAME_LOWER") and not any(pads))
    checks = [(list(a.get("kernel_shape", [3, 3])) == [3, 3], "a 3×3 kernel"),
              (list(a.get("strides", [1, 1])) == [1, 1], "stride 1"),
              (list(a.get("dilations", [1, 1])) == [1, 1], "no dilation"),
              (int(a.get("group", 1)) == 1, "one group"), (same, "one pixel of padding on each side")]
    for ok, what in checks:
        if not ok:
            raise _not_vgg(path, f"Conv node {node.name!r} has not {what} ({a})")


def read_convs(path: str | Path) -> list[ConvNode]:
    """The Conv nodes of the ONNX file at ``path`` in graph order, checked (see the module)."""
    path = Path(path)
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        from nstjax.weights.formats import WeightsError

        raise WeightsError(f"reading {path} (an ONNX file) needs the onnx package: "
                           "pip install 'nstjax[onnx]'") from None
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as e:
        raise ValueError(f"not an ONNX protobuf: {e}") from None
    initializers = {t.name: t for t in model.graph.initializer}
    convs = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        _check_conv(path, node)
        tensors = []
        for role, name in zip(("weight", "bias"), list(node.input[1:3]) + [""] * (3 - len(node.input))):
            if role == "bias" and not name:
                raise _not_vgg(path, f"Conv node {node.name!r} has no bias")
            t = initializers.get(name)
            if t is None:
                raise _not_vgg(path, f"the {role} of Conv node {node.name!r} ({name!r}) is not an initializer "
                                     "of the file")
            if t.data_location == onnx.TensorProto.EXTERNAL:
                raise _not_vgg(path, f"the {role} of Conv node {node.name!r} is stored outside the file "
                                     "(external data is not read)")
            if t.data_type not in _FLOAT_TYPES:
                raise _not_vgg(path, f"the {role} of Conv node {node.name!r} is not floating point")
            tensors.append(t)
        kernel, bias = tensors

        def read(kernel=kernel, bias=bias, node=node):
            arrays = []
            for t in (kernel, bias):
                array = numpy_helper.to_array(t)
                if array.shape != tuple(t.dims):
                    raise _not_vgg(path, f"Conv node {node.name!r}: a tensor holds {array.size} values "
                                         f"for its declared shape {tuple(t.dims)}")
                arrays.append(array)
            return tuple(arrays)

        convs.append(ConvNode(node.name, tuple(kernel.dims), tuple(bias.dims), read))
    return convs
