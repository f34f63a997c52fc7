"""nstjax.weights: formats, canonical files, the download path (against a loopback server), CLI."""

import dataclasses
import errno
import functools
import hashlib
import importlib.util
import http.server
import io
import json
import os
import pathlib
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile

import h5py
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import weights_fixtures as wf
from nstjax.errors import UserError
from nstjax.vgg import CAFFE, TORCHVISION, Preprocessing
from nstjax.weights import (DEFAULT, SOURCES, VGGWeights, WeightsError, cache_dir, fetch_source,
                            load_weights, save_canonical)
from nstjax.weights import __main__ as weights_main
from nstjax.weights.formats import save_npz

ROOT = pathlib.Path(__file__).resolve().parent.parent
KERAS_NAME = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"


@pytest.fixture(scope="module")
def params():
    return wf.synthetic_params(0)


@pytest.fixture(scope="module")
def files(params, tmp_path_factory):
    """One file per layout but .pth (see pth_file), all with the same synthetic params."""
    d = tmp_path_factory.mktemp("weights")
    paths = {"h5": d / "keras.h5", "safetensors": d / "tv.safetensors", "npz": d / "canonical.npz",
             "npz-meta": d / "canonical-meta.npz"}
    wf.write_keras_h5(paths["h5"], params)
    wf.write_torchvision_safetensors(paths["safetensors"], params)
    wf.write_npz(paths["npz"], params)
    wf.write_npz(paths["npz-meta"], params, TORCHVISION)
    return paths


@pytest.fixture(scope="module")
def pth_file(params, tmp_path_factory):
    """The same params as a torchvision state dict saved with torch.save (tests marked torch)."""
    path = tmp_path_factory.mktemp("pth") / "tv.pth"
    wf.write_pth(path, params)
    return path


def weights_file(kind, files, request):
    """files[kind], or the pth_file fixture for kind "pth"."""
    return request.getfixturevalue("pth_file") if kind == "pth" else files[kind]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("NSTJAX_CACHE", str(path))
    return path


def assert_same_params(got, want):
    assert list(got) == wf.conv_names()
    for name in wf.conv_names():
        assert set(got[name]) == {"kernel", "bias"}
        for part in ("kernel", "bias"):
            assert got[name][part].dtype == np.float32
            np.testing.assert_array_equal(got[name][part], want[name][part], err_msg=f"{name} {part}")


def sha256(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def error(fn, *args, **kwargs) -> str:
    """The one-line message of the WeightsError that ``fn`` raises."""
    with pytest.raises(WeightsError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message and message
    assert isinstance(e.value, UserError) and e.value.exit_code == 2
    return message


# --- the registry -------------------------------------------------------------------------------

def test_registry_sources():
    assert DEFAULT == "vgg19"
    assert list(SOURCES) == ["vgg19", "vgg19-torchvision", "vgg19-torchvision-pth", "vgg16",
                             "vgg16-torchvision-pth", "vgg13-torchvision-pth", "vgg11-torchvision-pth"]
    keras = SOURCES["vgg19"]  # the file and md5 keras/src/applications/vgg19.py pins (include_top=False)
    assert keras.url == ("https://storage.googleapis.com/tensorflow/keras-applications/vgg19/"
                         "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5")
    assert keras.filename == KERAS_NAME and keras.size == 80_134_624
    assert keras.known_hash == "md5:253f8cb515780f3b799900260a226db6"
    assert keras.preprocessing == CAFFE and keras.licence == "CC BY 4.0"
    tv = SOURCES["vgg19-torchvision"]
    assert tv.url == "https://huggingface.co/timm/vgg19.tv_in1k/resolve/main/model.safetensors"
    assert tv.known_hash == ("sha256:11aea017b543ff59233749d8f1cf544cda749378f5790d2fedab841fb86b7669")
    assert tv.preprocessing == TORCHVISION and tv.licence == "BSD-3-Clause"
    pth = SOURCES["vgg19-torchvision-pth"]  # torchvision's VGG19_Weights.IMAGENET1K_V1
    assert pth.url == "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
    assert pth.url.rsplit("/", 1)[1] == pth.filename and pth.filename.endswith(".pth")
    assert pth.preprocessing == TORCHVISION and pth.licence == "BSD-3-Clause"
    keras16 = SOURCES["vgg16"]  # keras/src/applications/vgg16.py: WEIGHTS_PATH_NO_TOP and its md5
    assert keras16.url == ("https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
                           "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
    assert keras16.known_hash == "md5:6d6bbae143d832006294945121d1f1fc" and keras16.size == 58_889_256
    assert keras16.preprocessing == CAFFE and keras16.arch == "vgg16"
    # torchvision's VGG{11,13,16}_Weights.IMAGENET1K_V1 urls; their _file_size (MiB) for the sizes
    for arch, url, mib in (("vgg16", "https://download.pytorch.org/models/vgg16-397923af.pth", 527.796),
                           ("vgg13", "https://download.pytorch.org/models/vgg13-19584684.pth", 507.545),
                           ("vgg11", "https://download.pytorch.org/models/vgg11-8a719046.pth", 506.84)):
        source = SOURCES[f"{arch}-torchvision-pth"]
        assert source.url == url and source.arch == arch and source.preprocessing == TORCHVISION
        assert source.approx_size / 2**20 == pytest.approx(mib, abs=5e-4)
    assert SOURCES["vgg16-torchvision-pth"].size == 553_433_881
    assert [s.arch for s in SOURCES.values()] == ["vgg19"] * 3 + ["vgg16", "vgg16", "vgg13", "vgg11"]
    assert [s.check for s in SOURCES.values()] == ["md5 full", "sha256 full"] + ["sha256 prefix", "md5 full"] + [
        "sha256 prefix"] * 3


@pytest.mark.torch
def test_pth_pin_is_the_prefix_torch_hub_reads_from_its_name():
    import torch

    for pth in (s for s in SOURCES.values() if s.filename.endswith(".pth")):
        # torch.hub's check_hash: the sha256 must start with the hex digits after the name's last '-'
        assert pth.known_hash == "sha256:" + torch.hub.HASH_REGEX.search(pth.filename).group(1)


def test_hash_pins_are_whole_or_long_enough_prefixes():
    source = SOURCES["vgg19-torchvision-pth"]
    assert source.hash_matches("dcbb9e9d" + "0" * 56) and not source.hash_matches("dcbb9e9e" + "0" * 56)
    for bad in ("sha256:dcbb", "sha256:" + "0" * 65, "sha1:" + "0" * 40, "sha256:DCBB9E9D", "dcbb9e9d"):
        with pytest.raises(ValueError):
            dataclasses.replace(source, known_hash=bad)


def test_every_model_config_names_a_registry_source():
    from nstjax import config

    models = {p.stem: config.compose([f"model={p.stem}"]).model for p in (ROOT / "configs" / "model").glob("*.yaml")}
    names = {name: m.weights for name, m in models.items()}
    assert names == {"vgg19": "vgg19", "vgg19_torchvision": "vgg19-torchvision",
                     "vgg19_torchvision_pth": "vgg19-torchvision-pth", "vgg16": "vgg16",
                     "vgg16_torchvision_pth": "vgg16-torchvision-pth"}
    for name, m in models.items():  # each names the network of its weights
        assert m.arch.value == SOURCES[names[name]].arch, name


# --- reading each format ------------------------------------------------------------------------

@pytest.mark.parametrize("kind, preprocessing", [
    ("h5", CAFFE), ("safetensors", TORCHVISION), ("npz-meta", TORCHVISION),
    pytest.param("pth", TORCHVISION, marks=pytest.mark.torch),
])
def test_every_format_loads_the_same_params(files, params, kind, preprocessing, request):
    path = weights_file(kind, files, request)
    w = load_weights(path)
    assert_same_params(w.params, params)
    assert w.preprocessing == preprocessing
    assert w.source == str(path)
    assert w.sha256 == sha256(path)


def test_npz_without_metadata_needs_the_preprocessing(files, params):
    assert "preprocessing" in error(load_weights, files["npz"])
    w = load_weights(files["npz"], preprocessing=CAFFE)
    assert_same_params(w.params, params)
    assert w.preprocessing == CAFFE


def test_npz_layout_decides_the_preprocessing(params, tmp_path):
    for layout, state, want in (
        ("keras", {f"{g}/{g}_{p}_1:0": params[n]["kernel" if p == "W" else "bias"]
                   for n in wf.conv_names() for g in [wf.keras_group(n)] for p in "Wb"}, CAFFE),
        ("torchvision", wf.torchvision_state(params), TORCHVISION),
    ):
        path = tmp_path / f"{layout}.npz"
        np.savez(path, **state)
        w = load_weights(path)
        assert w.preprocessing == want, layout
        assert_same_params(w.params, params)


def test_preprocessing_override(files):
    custom = Preprocessing("RGB", 255.0, (120.0, 115.0, 100.0), (60.0, 60.0, 60.0))
    assert load_weights(files["h5"], preprocessing=custom).preprocessing == custom
    assert load_weights(files["safetensors"], preprocessing=CAFFE).preprocessing == CAFFE


def test_pth_without_torch_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    path = tmp_path / "vgg19.pth"
    path.write_bytes(b"not read: torch is missing")
    message = error(load_weights, path)
    assert "needs torch" in message and "pip install 'nstjax[torch]'" in message


class _Payload:
    """Runs code when unpickled: must never be unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.mark.torch
def test_pth_never_unpickles_anything_but_tensors(tmp_path):
    import torch

    marker = tmp_path / "unpickled"
    path = tmp_path / "payload.pth"
    torch.save({"features.0.weight": _Payload(marker)}, path)
    assert "state dict" in error(load_weights, path)
    assert not marker.exists()
    with open(tmp_path / "pickled.npz", "wb") as f:
        np.savez(f, obj=np.array([_Payload(marker)], dtype=object))
    error(load_weights, tmp_path / "pickled.npz")
    assert not marker.exists()


# --- the canonical file -------------------------------------------------------------------------

@pytest.mark.parametrize("preprocessing", [CAFFE, TORCHVISION], ids=["caffe", "torchvision"])
def test_canonical_file_round_trip(files, params, tmp_path, preprocessing):
    src = load_weights(files["safetensors"], preprocessing=preprocessing)
    path = tmp_path / "canonical.safetensors"
    save_canonical(path, src)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        keys, metadata = set(f.keys()), f.metadata()
        assert all(f.get_tensor(k).dtype == np.float32 for k in keys)
        assert f.get_tensor("conv1_1/kernel").shape == (3, 3, 3, 64)
    assert keys == {f"{n}/{p}" for n in wf.conv_names() for p in ("kernel", "bias")}  # no classifier
    assert Preprocessing(**json.loads(metadata["preprocessing"])) == preprocessing
    assert metadata["source"] == str(files["safetensors"])
    assert metadata["origin_sha256"] == sha256(files["safetensors"])
    w = load_weights(path)
    assert_same_params(w.params, params)
    assert w.preprocessing == preprocessing and w.sha256 == sha256(path)


def test_npz_written_by_nstjax_keeps_the_preprocessing(files, params, tmp_path):
    save_npz(tmp_path / "w.npz", load_weights(files["h5"]))
    w = load_weights(tmp_path / "w.npz")
    assert w.preprocessing == CAFFE
    assert_same_params(w.params, params)


def test_save_canonical_accepts_jax_arrays_and_checks_shapes(params, tmp_path):
    import jax.numpy as jnp

    w = VGGWeights({n: {k: jnp.asarray(v) for k, v in p.items()} for n, p in params.items()},
                   CAFFE, "synthetic", "")
    save_canonical(tmp_path / "a.safetensors", w)
    assert_same_params(load_weights(tmp_path / "a.safetensors").params, params)
    bad = dict(params, conv2_1={"kernel": np.zeros((3, 3, 64, 64), np.float32),
                                "bias": np.zeros(64, np.float32)})
    message = error(save_canonical, tmp_path / "b.safetensors", dataclasses.replace(w, params=bad))
    assert "conv2_1" in message and "(3, 3, 64, 128)" in message
    assert not (tmp_path / "b.safetensors").exists()


# --- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["h5", "safetensors", "npz",
                                  pytest.param("pth", marks=pytest.mark.torch)])
def test_truncated_and_corrupt_files(files, tmp_path, kind, request):
    src = weights_file(kind, files, request)
    data = src.read_bytes()
    path = tmp_path / src.name
    path.write_bytes(data[: len(data) // 2])
    message = error(load_weights, path)
    assert str(path) in message and "corrupt or truncated" in message
    path.write_bytes(b"garbage " * 64)
    assert "corrupt or truncated" in error(load_weights, path)


def test_wrong_shape(params, tmp_path):
    bad = dict(params, conv3_1={"kernel": np.zeros((3, 3, 128, 128), np.float32),
                                "bias": np.zeros(128, np.float32)})
    wf.write_keras_h5(tmp_path / "bad.h5", bad)
    message = error(load_weights, tmp_path / "bad.h5")
    assert "conv3_1 kernel" in message and "(3, 3, 128, 128)" in message
    assert "(3, 3, 128, 256)" in message and "not VGG19" in message


def test_missing_layer(params, tmp_path):
    state = wf.torchvision_state(params)
    del state["features.34.weight"]
    safetensors.numpy.save_file(state, str(tmp_path / "vgg.safetensors"))
    message = error(load_weights, tmp_path / "vgg.safetensors")
    assert "conv5_4" in message and "features.34.weight" in message and "complete VGG19" in message


def test_not_a_vgg_file(tmp_path):
    path = tmp_path / "x.safetensors"
    safetensors.numpy.save_file({"encoder.weight": np.zeros(3, np.float32)}, str(path))
    message = error(load_weights, path)
    assert "no VGG conv weights" in message and "encoder.weight" in message


def test_non_finite_values(params, tmp_path):
    bad = dict(params, conv1_2=dict(params["conv1_2"], kernel=params["conv1_2"]["kernel"].copy()))
    bad["conv1_2"]["kernel"][0, 0, 0, 0] = np.nan
    wf.write_npz(tmp_path / "nan.npz", bad, CAFFE)
    assert "conv1_2 kernel has NaN" in error(load_weights, tmp_path / "nan.npz")


def test_unknown_extension_name_and_missing_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    message = error(load_weights, tmp_path / "weights.bin")
    assert "'.bin'" in message and all(s in message for s in (".h5", ".safetensors", ".npz", ".pth"))
    message = error(load_weights, "vgg17")
    assert "'vgg17'" in message and "vgg19, vgg19-torchvision" in message and "path" in message
    message = error(load_weights, tmp_path / "missing.h5")
    assert "no such weights file" in message and "missing.h5" in message


# --- untrusted files: refused before anything is read or allocated --------------------------------

@pytest.fixture
def no_library_reads(monkeypatch):
    """Fails the test if a container library opens the file."""
    def refuse(*args, **kwargs):
        raise AssertionError("the file was handed to a library")
    libraries = [(safetensors, "safe_open"), (h5py, "File"), (np, "load")]
    if importlib.util.find_spec("torch") is not None:
        import torch

        libraries.append((torch, "load"))
    for module, name in libraries:
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("suffix", [".h5", ".safetensors", ".npz", ".pth"])
def test_huge_file_is_refused_unread(tmp_path, no_library_reads, suffix):
    path = tmp_path / f"huge{suffix}"
    with open(path, "wb") as f:
        f.truncate(3 << 30)  # sparse: no disk used
    assert path.stat().st_blocks * 512 < 1 << 20
    start = time.monotonic()
    message = error(load_weights, path)
    assert time.monotonic() - start < 1  # not even hashed
    assert str(path) in message and "3.0 GiB" in message and "at most 2 GiB" in message


def write_safetensors(path, header: dict, data: bytes = b"") -> None:
    """A safetensors file from its parts (the format: u64 header length, JSON, data)."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_safetensors_header_length_is_bounded(tmp_path, no_library_reads):
    path = tmp_path / "a.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    message = error(load_weights, path)
    assert "1,099,511,627,776-byte header" in message and "corrupt or truncated" in message
    with open(path, "wb") as f:  # a header within the file, yet far larger than VGG19's
        f.write(struct.pack("<Q", 512 << 20))
        f.truncate(1 << 30)
    message = error(load_weights, path)
    assert "536,870,912-byte safetensors header" in message and "16 MiB" in message


def test_safetensors_absurd_declared_shape(files, tmp_path, no_library_reads):
    data = files["safetensors"].read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header["features.0.weight"]["shape"] = [100_000, 100_000, 3, 3]
    path = tmp_path / "absurd.safetensors"
    write_safetensors(path, header, data[8 + length:])
    message = error(load_weights, path)
    assert "conv1_1 kernel has shape (3, 3, 100000, 100000)" in message
    assert "(3, 3, 3, 64)" in message
    write_safetensors(path, {"features.0.weight": {"dtype": "F32", "shape": [64, 3, 3, 3],
                                                   "data_offsets": [0, 1 << 40]}}, b"0" * 64)
    assert "past the end" in error(load_weights, path)


def test_h5_absurd_declared_shape_is_never_read(params, tmp_path, monkeypatch):
    path = tmp_path / "absurd.h5"
    wf.write_keras_h5(path, params)
    with h5py.File(path, "a") as f:
        del f["block1_conv1/block1_conv1_W_1:0"]
        f.create_dataset("block1_conv1/block1_conv1_W_1:0", shape=(100_000, 100_000, 3, 64),
                         dtype="f4", chunks=(1, 1, 3, 64))  # 7.7 TB declared, nothing stored
    assert path.stat().st_size < 200 << 20
    read = []
    real = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__",
                        lambda self, key: read.append(self.name) or real(self, key))
    message = error(load_weights, path)
    assert "conv1_1 kernel has shape (100000, 100000, 3, 64)" in message
    assert read == []


def test_npz_absurd_declared_shape_is_never_read(params, tmp_path, monkeypatch):
    src, path = tmp_path / "w.npz", tmp_path / "absurd.npz"
    wf.write_npz(src, params, CAFFE)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (100_000, 100_000, 3, 64)})
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(path, "w") as b:
        for member in a.namelist():
            b.writestr(member, header.getvalue() if member == "conv1_1/kernel.npy" else a.read(member))
    read = []
    real = np.lib.format.read_array
    monkeypatch.setattr(np.lib.format, "read_array",
                        lambda fp, *a, **k: read.append(fp.name) or real(fp, *a, **k))
    message = error(load_weights, path)
    assert "conv1_1 kernel has shape (100000, 100000, 3, 64)" in message
    assert "conv1_1/kernel.npy" not in read


def test_bad_timeout_variable(cache, monkeypatch):
    monkeypatch.setenv("NSTJAX_DOWNLOAD_TIMEOUT", "soon")
    source = dataclasses.replace(SOURCES["vgg19"], url="http://127.0.0.1:1/x.h5")
    monkeypatch.setitem(SOURCES, "vgg19", source)
    assert "NSTJAX_DOWNLOAD_TIMEOUT='soon'" in error(load_weights, "vgg19")


# --- the download path, for real, against a loopback server ---------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1; yields (folder, base URL, requests seen)."""
    root = tmp_path / "www"
    root.mkdir()
    seen = []
    handler = functools.partial(type("H", (_Handler,), {"requests": seen}), directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def keras_file(files):
    return files["h5"]


def cached_files(cache) -> set[str]:
    """The cache dir's files, except the lock files (left by filelock on some platforms)."""
    return {p.name for p in cache.iterdir() if p.suffix != ".lock"}


def keras_source(path, url, algorithm="md5", digest=None):
    """The real vgg19 entry with a test URL, size and checksum."""
    digest = digest or hashlib.new(algorithm, path.read_bytes()).hexdigest()
    return dataclasses.replace(SOURCES["vgg19"], url=url, size=path.stat().st_size,
                               known_hash=f"{algorithm}:{digest}")


def test_download_converts_and_caches(server, keras_file, params, cache, monkeypatch):
    root, base, seen = server
    (root / KERAS_NAME).write_bytes(keras_file.read_bytes())
    monkeypatch.setitem(SOURCES, "vgg19", keras_source(keras_file, f"{base}/{KERAS_NAME}"))
    w = load_weights("vgg19")
    assert seen == [f"/{KERAS_NAME}"]
    assert cache_dir() == cache
    assert cached_files(cache) == {"vgg19.safetensors", "vgg19.safetensors.sha256"}  # raw file removed
    assert w.source == "vgg19" and w.preprocessing == CAFFE
    assert w.sha256 == sha256(cache / "vgg19.safetensors")
    assert_same_params(w.params, params)
    with safetensors.safe_open(str(cache / "vgg19.safetensors"), framework="numpy") as f:
        assert f.metadata()["origin_sha256"] == sha256(keras_file)
        assert f.metadata()["source"] == "vgg19"
    (root / KERAS_NAME).unlink()
    again = load_weights("vgg19")  # no file on the server: read from the cache
    assert seen == [f"/{KERAS_NAME}"]
    assert_same_params(again.params, params)


def test_wrong_checksum_removes_the_file(server, keras_file, cache, monkeypatch):
    root, base, _ = server
    (root / KERAS_NAME).write_bytes(keras_file.read_bytes())
    url = f"{base}/{KERAS_NAME}"
    monkeypatch.setitem(SOURCES, "vgg19", keras_source(keras_file, url, digest="0" * 32))
    message = error(load_weights, "vgg19")
    assert "does not match its checksum md5:" + "0" * 32 in message and url in message
    assert hashlib.md5(keras_file.read_bytes()).hexdigest() in message
    assert not cache.exists() or cached_files(cache) == set()


@pytest.mark.torch
def test_sha256_prefix_is_checked_as_torch_hub_checks_it(server, params, cache, tmp_path, monkeypatch):
    """A synthetic .pth served under a torchvision-style name with its real sha256 prefix."""
    import torch

    root, base, seen = server
    wf.write_pth(tmp_path / "synthetic.pth", params)
    data = (tmp_path / "synthetic.pth").read_bytes()
    prefix = hashlib.sha256(data).hexdigest()[:8]
    name, canonical = f"vgg19-{prefix}.pth", "vgg19-torchvision-pth.safetensors"
    url = f"{base}/{name}"
    source = dataclasses.replace(SOURCES["vgg19-torchvision-pth"], filename=name, size=len(data),
                                 known_hash=f"sha256:{prefix}")
    monkeypatch.setitem(SOURCES, source.name, source)
    monkeypatch.setenv(source.url_variable, url)
    (root / name).write_bytes(data)
    torch.hub.download_url_to_file(url, str(tmp_path / "hub.pth"), hash_prefix=prefix, progress=False)
    w = load_weights(source.name)  # accepted, as torch.hub accepts it
    assert seen[-1] == f"/{name}" and w.preprocessing == TORCHVISION
    assert_same_params(w.params, params)
    assert (cache / canonical).is_file() and not (cache / name).exists()

    altered = bytearray(data)
    altered[len(data) // 2] ^= 0xFF  # same size, other content
    (root / name).write_bytes(bytes(altered))
    with pytest.raises(RuntimeError, match="invalid hash value"):
        torch.hub.download_url_to_file(url, str(tmp_path / "hub2.pth"), hash_prefix=prefix,
                                       progress=False)
    monkeypatch.setenv("NSTJAX_CACHE", str(tmp_path / "empty-cache"))
    message = error(load_weights, source.name)
    assert (f"does not match its checksum sha256:{prefix} (sha256 prefix; got "
            f"{hashlib.sha256(altered).hexdigest()})") in message
    assert url in message and "was removed" in message
    assert cached_files(tmp_path / "empty-cache") == set()


def test_http_error(server, keras_file, cache):
    _, base, _ = server
    message = error(fetch_source, keras_source(keras_file, f"{base}/missing.h5"))
    assert "HTTP 404" in message and f"{base}/missing.h5" in message


def test_unreachable_host_is_one_clear_line(keras_file, cache):
    source = keras_source(keras_file, "http://127.0.0.1:1/vgg19.h5")
    start = time.monotonic()
    message = error(fetch_source, source)
    assert time.monotonic() - start < 10
    assert "http://127.0.0.1:1/vgg19.h5" in message and "Connection refused" in message
    assert KERAS_NAME in message and f"{source.size:,} bytes" in message
    assert source.known_hash.split(":")[1] in message and str(cache) in message


def test_silent_server_times_out(keras_file, cache, monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts connections, never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/vgg19.h5"
        monkeypatch.setenv("NSTJAX_DOWNLOAD_TIMEOUT", "0.5")
        start = time.monotonic()
        message = error(fetch_source, keras_source(keras_file, url))
    assert time.monotonic() - start < 10
    assert "no answer within 0.5 s" in message and url in message


def test_url_variable_overrides_the_url(server, keras_file, params, cache, monkeypatch):
    root, base, seen = server
    (root / "mirror.h5").write_bytes(keras_file.read_bytes())
    source = keras_source(keras_file, "http://127.0.0.1:1/unused.h5")
    monkeypatch.setenv("NSTJAX_WEIGHTS_URL_VGG19", f"{base}/mirror.h5")
    assert_same_params(load_weights(fetch_source(source)).params, params)
    assert seen == ["/mirror.h5"]


def test_raw_file_placed_by_hand_is_picked_up(keras_file, params, cache):
    cache.mkdir()
    (cache / KERAS_NAME).write_bytes(keras_file.read_bytes())
    path = fetch_source(keras_source(keras_file, "http://127.0.0.1:1/unreachable.h5", "sha256"))
    assert path == cache / "vgg19.safetensors"
    assert not (cache / KERAS_NAME).exists()
    w = load_weights(path)
    assert w.preprocessing == CAFFE
    assert_same_params(w.params, params)


def test_wrong_raw_file_placed_by_hand(keras_file, cache):
    cache.mkdir()
    data = keras_file.read_bytes()
    raw = cache / KERAS_NAME
    raw.write_bytes(data[:-10])
    source = keras_source(keras_file, "http://127.0.0.1:1/unreachable.h5")
    message = error(fetch_source, source)
    assert str(raw) in message and "incomplete download" in message
    raw.write_bytes(data[:-10] + b"0123456789")
    message = error(fetch_source, source)
    assert str(raw) in message and "does not match its checksum" in message and "delete it" in message


# --- a cache shared by concurrent processes, and its integrity ----------------------------------

_FETCHER = """
import dataclasses, json, pathlib, sys, time
from nstjax.weights import SOURCES, fetch
args = json.loads(sys.argv[1])
SOURCES["vgg19"] = dataclasses.replace(SOURCES["vgg19"], url=args["url"], size=args["size"],
                                       known_hash=args["known_hash"])
pathlib.Path(args["ready"]).touch()
start, deadline = pathlib.Path(args["start"]), time.monotonic() + 60
while not start.exists():  # the barrier: every process is started, imported and waiting
    assert time.monotonic() < deadline, "never started"
    time.sleep(0.001)
print(fetch("vgg19"))
"""


@pytest.mark.slow
def test_processes_started_at_once_share_one_download(server, keras_file, params, cache, tmp_path):
    root, base, seen = server
    (root / KERAS_NAME).write_bytes(keras_file.read_bytes())
    source = keras_source(keras_file, f"{base}/{KERAS_NAME}")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = dict(os.environ, NSTJAX_CACHE=str(cache), JAX_PLATFORMS="cpu")
    children = [subprocess.Popen(
        [sys.executable, "-c", _FETCHER, json.dumps({
            "url": source.url, "size": source.size, "known_hash": source.known_hash,
            "ready": str(barrier / f"ready-{i}"), "start": str(barrier / "start")})],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(3)]
    try:
        deadline = time.monotonic() + 60
        while len(list(barrier.iterdir())) < len(children):
            assert time.monotonic() < deadline and all(c.poll() is None for c in children)
            time.sleep(0.01)
        (barrier / "start").touch()
        results = [c.communicate(timeout=120) for c in children]
    finally:
        for c in children:
            c.kill()
    assert [c.returncode for c in children] == [0] * len(children), [err for _, err in results]
    assert seen == [f"/{KERAS_NAME}"]  # served once
    assert cached_files(cache) == {"vgg19.safetensors", "vgg19.safetensors.sha256"}
    assert [out.strip() for out, _ in results] == [str(cache / "vgg19.safetensors")] * len(children)
    digest = sha256(cache / "vgg19.safetensors")
    assert (cache / "vgg19.safetensors.sha256").read_text() == f"{digest}  vgg19.safetensors\n"
    assert_same_params(load_weights(cache / "vgg19.safetensors").params, params)
    assert sum("waiting for another process" in err for _, err in results) >= 1


@pytest.fixture
def served_vgg19(server, keras_file, cache, monkeypatch):
    """The vgg19 source served by the loopback server; yields the requests seen."""
    root, base, seen = server
    (root / KERAS_NAME).write_bytes(keras_file.read_bytes())
    monkeypatch.setitem(SOURCES, "vgg19", keras_source(keras_file, f"{base}/{KERAS_NAME}"))
    return seen


@pytest.mark.slow
def test_corrupt_canonical_file_is_refused_and_the_message_rebuilds_it(served_vgg19, params, cache,
                                                                        capsys):
    path = fetch_source(SOURCES["vgg19"])
    assert (cache / "vgg19.safetensors.sha256").read_text().split() == [sha256(path), path.name]
    good = path.read_bytes()
    altered = bytearray(good)
    altered[len(good) // 2] ^= 0x01  # the same size, a slightly different weight
    for bad in (good[: len(good) // 2], bytes(altered)):
        path.write_bytes(bad)
        message = error(load_weights, "vgg19")
        assert str(path) in message and "corrupt" in message and hashlib.sha256(bad).hexdigest() in message
        assert "delete it and run python -m nstjax.weights fetch vgg19 to rebuild it" in message
    path.unlink()  # what the message says
    code, out, _ = main("fetch", "vgg19", capsys=capsys)
    assert code == 0 and out.strip() == str(path)
    assert len(served_vgg19) == 2  # downloaded and converted again
    assert (cache / "vgg19.safetensors.sha256").read_text().split() == [sha256(path), path.name]
    assert_same_params(load_weights("vgg19").params, params)


def test_canonical_file_copied_in_by_hand_is_checked_then_recorded(synthetic_weights_file, cache,
                                                                    monkeypatch):
    monkeypatch.setenv("NSTJAX_WEIGHTS_URL_VGG19", "http://127.0.0.1:1/unreachable.h5")
    cache.mkdir()
    path, record = cache / "vgg19.safetensors", cache / "vgg19.safetensors.sha256"
    data = synthetic_weights_file.read_bytes()
    path.write_bytes(data[:-100])
    message = error(load_weights, "vgg19")
    assert "corrupt or truncated" in message and "python -m nstjax.weights fetch vgg19" in message
    assert not record.exists()
    path.write_bytes(data)
    assert load_weights("vgg19").sha256 == sha256(synthetic_weights_file)
    assert record.read_text() == f"{sha256(synthetic_weights_file)}  vgg19.safetensors\n"


def test_full_disk_while_converting(served_vgg19, params, cache, monkeypatch):
    real = safetensors.numpy.save_file

    def half_then_enospc(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.numpy, "save_file", half_then_enospc)
    message = error(load_weights, "vgg19")
    assert "cannot write" in message and "No space left on device" in message
    assert cached_files(cache) == {KERAS_NAME}  # the verified download stays, no temporary file
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    assert_same_params(load_weights("vgg19").params, params)  # converted without downloading again
    assert len(served_vgg19) == 1
    assert cached_files(cache) == {"vgg19.safetensors", "vgg19.safetensors.sha256"}


# --- the CLI ------------------------------------------------------------------------------------

def cli(*args, cache, **env) -> subprocess.CompletedProcess:
    """``python -m nstjax.weights ARGS`` as a subprocess."""
    e = dict(os.environ, NSTJAX_CACHE=str(cache), JAX_PLATFORMS="cpu", **env)
    return subprocess.run([sys.executable, "-m", "nstjax.weights", *map(str, args)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=120)


def main(*args, capsys) -> tuple[int, str, str]:
    """The same in this process (for the cheap cases)."""
    code = weights_main.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_fails(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert all(f in lines[0] for f in fragments), lines[0]


def test_cli_list_and_fetch(files, cache, capsys):
    result = cli("list", cache=cache)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "vgg19 (default)" in out and "vgg19-torchvision" in out and "80.1 MB" in out
    assert "CC BY 4.0" in out and "BSD-3-Clause" in out and str(cache) in out
    assert out.count(" no ") == len(SOURCES)
    checks = {line.split()[0]: line.split("  ")  for line in out.splitlines()[1:4]}
    assert "md5 full" in checks["vgg19"] and "sha256 full" in checks["vgg19-torchvision"]
    assert "sha256 prefix" in checks["vgg19-torchvision-pth"]
    save_canonical(cache / "vgg19.safetensors", load_weights(files["h5"]))
    code, out, _ = main("fetch", "vgg19", capsys=capsys)
    assert code == 0 and out.strip() == str(cache / "vgg19.safetensors")
    code, out, _ = main("list", capsys=capsys)
    assert code == 0 and out.count(" yes ") == 1 and out.count(" no ") == len(SOURCES) - 1
    assert_fails(*main("fetch", "vgg17", capsys=capsys)[::2], "unknown weights 'vgg17'",
                 "vgg19-torchvision")


def test_cli_fetch_offline_is_one_line(cache):
    result = cli("fetch", "vgg19-torchvision", cache=cache,
                 NSTJAX_WEIGHTS_URL_VGG19_TORCHVISION="http://127.0.0.1:1/model.safetensors")
    assert_fails(result.returncode, result.stderr, "http://127.0.0.1:1/model.safetensors",
                 "model.safetensors", SOURCES["vgg19-torchvision"].known_hash.split(":")[1], str(cache))


@pytest.mark.torch
@pytest.mark.slow
def test_cli_convert_and_info(pth_file, params, tmp_path, cache, capsys):
    dst = tmp_path / "out.safetensors"
    result = cli("convert", pth_file, dst, cache=cache)
    assert result.returncode == 0, result.stderr
    assert f"wrote {dst}" in result.stdout
    w = load_weights(dst)
    assert w.preprocessing == TORCHVISION and w.source == str(dst)
    assert_same_params(w.params, params)

    result = cli("info", dst, cache=cache)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"sha256: {sha256(dst)}" in out and "layout: canonical" in out
    assert "torchvision: RGB" in out and f"source: {pth_file}" in out
    assert "conv1_1  kernel (3, 3, 3, 64)  bias (64,)" in out
    assert "conv5_4  kernel (3, 3, 512, 512)  bias (512,)" in out


def test_cli_convert_npz_and_bad_arguments(files, tmp_path, cache, capsys):
    code, out, _ = main("convert", files["npz"], tmp_path / "out.npz", "--preprocessing", "caffe",
                        capsys=capsys)
    assert code == 0
    assert load_weights(tmp_path / "out.npz").preprocessing == CAFFE
    code, out, _ = main("info", files["npz"], capsys=capsys)
    assert code == 0 and "preprocessing: unknown" in out
    assert_fails(*main("convert", files["npz"], tmp_path / "x.safetensors", capsys=capsys)[::2],
                 "preprocessing")
    assert_fails(*main("convert", files["h5"], tmp_path / "x.pt", capsys=capsys)[::2], "x.pt", ".npz")
    assert_fails(*main("info", tmp_path / "missing.h5", capsys=capsys)[::2], "no such weights file")
