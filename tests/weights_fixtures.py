"""Synthetic VGG19 weights and writers for each file layout, independent of nstjax.weights.

``synthetic_params`` has the full VGG19 shapes with He-scaled random values,
so activations stay finite and of order one through all 16 layers.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import safetensors.numpy

from nstjax.vgg import CONV_LAYERS, conv_shapes

TORCHVISION_INDICES = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)


def synthetic_params(seed: int = 0) -> dict:
    """``{conv1_1: {kernel: (3, 3, in, out), bias: (out,)}, ...}`` float32 numpy arrays."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, (kshape, bshape) in conv_shapes().items():
        std = np.float32(np.sqrt(2.0 / (9 * kshape[2])))
        params[name] = {
            "kernel": rng.standard_normal(kshape, dtype=np.float32) * std,
            "bias": rng.standard_normal(bshape, dtype=np.float32) * np.float32(0.01),
        }
    return params


def keras_group(name: str) -> str:
    return f"block{name[4]}_conv{name[6]}"


def write_keras_h5(path, params: dict) -> None:
    """The layout of Keras' vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5."""
    with h5py.File(path, "w") as f:
        layer_names = ["input_1"]
        for name in CONV_LAYERS:
            group = keras_group(name)
            g = f.create_group(group)
            weight_names = [f"{group}_W_1:0", f"{group}_b_1:0"]
            g.attrs["weight_names"] = np.array(weight_names, dtype="S")
            g.create_dataset(weight_names[0], data=params[name]["kernel"])
            g.create_dataset(weight_names[1], data=params[name]["bias"])
            layer_names.append(group)
            if name in ("conv1_2", "conv2_2", "conv3_4", "conv4_4", "conv5_4"):
                pool = f"block{name[4]}_pool"
                f.create_group(pool).attrs["weight_names"] = np.array([], dtype="S")
                layer_names.append(pool)
        f.attrs["layer_names"] = np.array(layer_names, dtype="S")


def torchvision_state(params: dict) -> dict:
    """``features.N.weight`` (OIHW) and ``features.N.bias`` numpy arrays."""
    state = {}
    for index, name in zip(TORCHVISION_INDICES, CONV_LAYERS):
        kernel = params[name]["kernel"].transpose(3, 2, 0, 1)
        state[f"features.{index}.weight"] = np.ascontiguousarray(kernel)
        state[f"features.{index}.bias"] = params[name]["bias"].copy()
    return state


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
              for name in CONV_LAYERS for part in ("kernel", "bias")}
    if preprocessing is not None:
        arrays["metadata.preprocessing"] = np.array(json.dumps(preprocessing.to_dict()))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_pth(path, params: dict) -> None:
    """A torchvision VGG19 ``features`` state dict saved with torch.save."""
    import torch

    state = {k: torch.from_numpy(v) for k, v in torchvision_state(params).items()}
    state["classifier.6.bias"] = torch.zeros(10)
    torch.save(state, path)
