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
    jax.config.update("jax_compilation_cache_dir", str(path / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
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
