"""ONNX files as weights: synthetic exports built with onnx's helper API, read back by nstjax."""

import numpy as np
import pytest

import weights_fixtures as wf
from nstjax.errors import UserError
from nstjax.vgg import CAFFE
from nstjax.weights import load_weights, read_file

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def export(path, params: dict, *, head: bool = False, nhwc: bool = True, conv_attrs=None, drop_bias=None,
           external=None, weights_as_node=None) -> None:
    """An ONNX graph of a VGG conv base as tf2onnx writes a Keras model: an NHWC input transposed
    to NCHW, Conv (OIHW initializers) + Relu per convolution, MaxPool after each block, and
    optionally a classifier head (Flatten, MatMul, Add, Softmax)."""
    nodes, inits = [], []
    x = "input"
    if nhwc:
        nodes.append(helper.make_node("Transpose", [x], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"))
        x = "nchw"
    names = list(params)
    for k, name in enumerate(names):
        w, b = f"{name}/kernel", f"{name}/bias"
        kernel = params[name]["kernel"].transpose(3, 2, 0, 1)
        if weights_as_node == name:  # the weight made by a node, not an initializer
            nodes.append(helper.make_node("Constant", [], [w], value=numpy_helper.from_array(kernel, w + "_value")))
        else:
            tensor = numpy_helper.from_array(kernel, w)
            if external == name:
                tensor.data_location = TensorProto.EXTERNAL
                tensor.ClearField("raw_data")
                tensor.external_data.add(key="location", value="weights.bin")
            inits.append(tensor)
        inputs = [x, w]
        if drop_bias != name:
            inits.append(numpy_helper.from_array(params[name]["bias"], b))
            inputs.append(b)
        attrs = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [1, 1], "dilations": [1, 1], "group": 1}
        attrs.update((conv_attrs or {}).get(name, {}))
        nodes.append(helper.make_node("Conv", inputs, [f"{name}/out"], name=f"{name}/Conv", **attrs))
        nodes.append(helper.make_node("Relu", [f"{name}/out"], [f"{name}/relu"], name=f"{name}/Relu"))
        x = f"{name}/relu"
        if k + 1 == len(names) or names[k + 1][4] != name[4]:
            nodes.append(helper.make_node("MaxPool", [x], [f"pool{name[4]}"], kernel_shape=[2, 2], strides=[2, 2]))
            x = f"pool{name[4]}"
    if head:
        nodes.append(helper.make_node("Flatten", [x], ["flat"]))
        inits += [numpy_helper.from_array(np.ones((512, 4), np.float32), "dense/w"),
                  numpy_helper.from_array(np.zeros(4, np.float32), "dense/b")]
        nodes += [helper.make_node("MatMul", ["flat", "dense/w"], ["mm"]),
                  helper.make_node("Add", ["mm", "dense/b"], ["logits"]),
                  helper.make_node("Softmax", ["logits"], ["probs"])]
        x = "probs"
    shape = [None, 32, 32, 3] if nhwc else [None, 3, 32, 32]
    graph = helper.make_graph(nodes, "vgg", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


@pytest.fixture(scope="module")
def params16():
    return wf.synthetic_params(3, "vgg16")


@pytest.mark.parametrize("arch, head, nhwc", [("vgg16", False, True), ("vgg16", True, True), ("vgg19", True, False),
                                              ("vgg19", False, True), ("vgg11", True, True)])
def test_an_export_reads_as_its_network(tmp_path, arch, head, nhwc):
    params = wf.synthetic_params(4, arch)
    path = tmp_path / "model.onnx"
    export(path, params, head=head, nhwc=nhwc)
    f = read_file(path)
    assert (f.layout, f.arch, f.preprocessing) == ("onnx", arch, None)
    assert list(f.params) == wf.conv_names(arch)
    for name in params:  # OIHW in the file, HWIO here, every value as written
        for part in ("kernel", "bias"):
            assert f.params[name][part].dtype == np.float32
            np.testing.assert_array_equal(f.params[name][part], params[name][part], err_msg=f"{name} {part}")
    weights = load_weights(path, preprocessing=CAFFE)
    assert weights.arch == arch and weights.preprocessing == CAFFE


def test_preprocessing_must_be_given(tmp_path, params16):
    export(tmp_path / "model.onnx", params16)
    with pytest.raises(UserError) as e:
        load_weights(tmp_path / "model.onnx")
    message = str(e.value)
    assert "does not say which preprocessing" in message and "model.preprocessing.channel_order" in message
    assert "BGR" in message and "103.939" in message and "\n" not in message


def _refused(path) -> str:
    with pytest.raises(UserError) as e:
        load_weights(path, preprocessing=CAFFE)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    return str(e.value)


def test_not_a_vgg_conv_base_is_refused_saying_what_was_found(tmp_path, params16):
    twelve = {k: v for k, v in list(params16.items())[:12]}
    export(tmp_path / "twelve.onnx", twelve)
    message = _refused(tmp_path / "twelve.onnx")
    assert "12 Conv nodes" in message and "not a VGG conv base" in message
    export(tmp_path / "stride.onnx", params16, conv_attrs={"conv2_1": {"strides": [2, 2]}})
    assert "'conv2_1/Conv' has not stride 1" in _refused(tmp_path / "stride.onnx")
    export(tmp_path / "nobias.onnx", params16, drop_bias="conv3_2")
    assert "'conv3_2/Conv' has no bias" in _refused(tmp_path / "nobias.onnx")
    export(tmp_path / "node.onnx", params16, weights_as_node="conv1_1")
    assert "not an initializer" in _refused(tmp_path / "node.onnx")
    export(tmp_path / "external.onnx", params16, external="conv4_1")
    assert "external data is not read" in _refused(tmp_path / "external.onnx")


def test_inconsistent_shapes_are_refused_before_reading(tmp_path, params16):
    bad = dict(params16)
    bad["conv3_1"] = {"kernel": np.zeros((3, 3, 128, 200), np.float32), "bias": np.zeros(200, np.float32)}
    export(tmp_path / "shapes.onnx", bad)
    message = _refused(tmp_path / "shapes.onnx")
    assert "conv3_1 kernel has shape (3, 3, 128, 200), VGG16 needs (3, 3, 128, 256)" in message


def test_a_truncated_or_foreign_file_is_refused(tmp_path, params16):
    export(tmp_path / "whole.onnx", params16, head=True)
    data = (tmp_path / "whole.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    message = _refused(tmp_path / "cut.onnx")
    assert "cannot read" in message and "cut.onnx as an ONNX file" in message and "corrupt or truncated" in message
    (tmp_path / "text.onnx").write_text("not a model at all\n" * 50)
    assert "corrupt or truncated" in _refused(tmp_path / "text.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")  # an empty protobuf is a model with no graph
    assert "0 Conv nodes" in _refused(tmp_path / "empty.onnx")
