"""Synthetic VGG weights and writers for each file layout, independent of nstjax.

``synthetic_params`` has the full shapes of a VGG network (VGG19 unless asked)
with He-scaled random values, so activations stay finite and of order one
through all its layers. The networks are torchvision's ``cfgs``.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import safetensors.numpy

TORCHVISION_CFGS = {  # torchvision/models/vgg.py: cfgs "A", "B", "D", "E"; a number: a 3×3 conv + ReLU
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


def conv_table(arch: str = "vgg19") -> list[tuple[str, int, tuple, tuple]]:
    """Each convolution of torchvision's ``arch``: (name conv{block}_{i}, its index in
    ``features`` as make_layers numbers it, HWIO kernel shape, bias shape)."""
    table, index, block, i, c_in = [], 0, 1, 0, 3
    for v in TORCHVISION_CFGS[arch]:
        if v == "M":
            index, block, i = index + 1, block + 1, 0
            continue
        i += 1
        table.append((f"conv{block}_{i}", index, (3, 3, c_in, v), (v,)))
        index, c_in = index + 2, v
    return table


def conv_names(arch: str = "vgg19") -> list[str]:
    return [name for name, *_ in conv_table(arch)]


def synthetic_params(seed: int = 0, arch: str = "vgg19") -> dict:
    """``{conv1_1: {kernel: (3, 3, in, out), bias: (out,)}, ...}`` float32 numpy arrays."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, _, kshape, bshape in conv_table(arch):
        std = np.float32(np.sqrt(2.0 / (9 * kshape[2])))
        params[name] = {
            "kernel": rng.standard_normal(kshape, dtype=np.float32) * std,
            "bias": rng.standard_normal(bshape, dtype=np.float32) * np.float32(0.01),
        }
    return params


def torch_features(arch: str = "vgg19", pooling: str = "max"):
    """torchvision.models.vgg.make_layers(cfgs[...]) for ``arch``, written out with torch.nn (with
    ``pooling='avg'``, average pooling in place of max, as Gatys et al.)."""
    import torch.nn as nn

    layers, c_in = [], 3
    for v in TORCHVISION_CFGS[arch]:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2) if pooling == "max" else nn.AvgPool2d(2, 2))
        else:
            layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU()]
            c_in = v
    return nn.Sequential(*layers)


def torch_layer_names(arch: str = "vgg19") -> list[str]:
    """The name of each module of :func:`torch_features`: conv{b}_{i}, relu{b}_{i}, pool{b}."""
    names, block, i = [], 1, 0
    for v in TORCHVISION_CFGS[arch]:
        if v == "M":
            names.append(f"pool{block}")
            block, i = block + 1, 0
        else:
            i += 1
            names += [f"conv{block}_{i}", f"relu{block}_{i}"]
    return names


def load_torch_features(features, params: dict, dtype=None):
    """``features`` with ``params`` (HWIO numpy) loaded in torchvision's layout."""
    import torch

    dtype = dtype or torch.float64
    features.load_state_dict({k.removeprefix("features."): torch.from_numpy(v).to(dtype)
                              for k, v in torchvision_state(params).items()})
    return features.to(dtype).eval()


def keras_group(name: str) -> str:
    return f"block{name[4]}_conv{name[6:]}"


def write_keras_h5(path, params: dict) -> None:
    """The layout of Keras' vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 (vgg16_… for a VGG16)."""
    names = list(params)
    with h5py.File(path, "w") as f:
        layer_names = ["input_1"]
        for k, name in enumerate(names):
            group = keras_group(name)
            g = f.create_group(group)
            weight_names = [f"{group}_W_1:0", f"{group}_b_1:0"]
            g.attrs["weight_names"] = np.array(weight_names, dtype="S")
            g.create_dataset(weight_names[0], data=params[name]["kernel"])
            g.create_dataset(weight_names[1], data=params[name]["bias"])
            layer_names.append(group)
            if k + 1 == len(names) or names[k + 1][4] != name[4]:  # the block's last convolution
                pool = f"block{name[4]}_pool"
                f.create_group(pool).attrs["weight_names"] = np.array([], dtype="S")
                layer_names.append(pool)
        f.attrs["layer_names"] = np.array(layer_names, dtype="S")


def torchvision_state(params: dict) -> dict:
    """``features.N.weight`` (OIHW) and ``features.N.bias`` numpy arrays."""
    state = {}
    for name, index, _, _ in conv_table(_arch_of(params)):
        kernel = params[name]["kernel"].transpose(3, 2, 0, 1)
        state[f"features.{index}.weight"] = np.ascontiguousarray(kernel)
        state[f"features.{index}.bias"] = params[name]["bias"].copy()
    return state


def _arch_of(params: dict) -> str:
    return next(arch for arch in TORCHVISION_CFGS if conv_names(arch) == list(params))


def write_torchvision_safetensors(path, params: dict, with_classifier: bool = True) -> None:
    """timm's vgg19.tv_in1k layout, with a small fake classifier when asked."""
    state = torchvision_state(params)
    if with_classifier:
        state["pre_logits.fc1.weight"] = np.ones((8, 512, 7, 7), np.float32)
        state["head.fc.weight"] = np.ones((10, 8), np.float32)
        state["head.fc.bias"] = np.zeros((10,), np.float32)
    safetensors.numpy.save_file(state, str(path), metadata={"format": "pt"})


def write_npz(path, params: dict, preprocessing=None) -> None:
    """Canonical key names (conv1_1/kernel); ``metadata.preprocessing`` when given."""
    arrays = {f"{name}/{part}": params[name][part]
              for name in params for part in ("kernel", "bias")}
    if preprocessing is not None:
        arrays["metadata.preprocessing"] = np.array(json.dumps(preprocessing.to_dict()))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_pth(path, params: dict) -> None:
    """A torchvision VGG ``features`` state dict saved with torch.save."""
    import torch

    state = {k: torch.from_numpy(v) for k, v in torchvision_state(params).items()}
    state["classifier.6.bias"] = torch.zeros(10)
    torch.save(state, path)
