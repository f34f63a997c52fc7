"""Shared fixtures: synthetic VGG19 weights (full shapes, random values), small images."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from weights_fixtures import synthetic_params as make_synthetic_params


@pytest.fixture(scope="session")
def synthetic_params():
    """VGG19 params with He-scaled random values, as jax arrays."""
    return jax.tree.map(jnp.asarray, make_synthetic_params(0))


@pytest.fixture(scope="session")
def nstjax_cache(tmp_path_factory):
    """A cache dir shared by the session's runs (weights, compiled programs)."""
    path = tmp_path_factory.mktemp("nstjax-cache")
    os.environ["NSTJAX_CACHE"] = str(path)
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
