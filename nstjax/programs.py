"""Compiled programs kept across processes: a program traced, lowered and compiled once for a
structure is loaded by every later process in a fraction of a second.

JAX's persistent compilation cache (``$NSTJAX_CACHE/xla``) saves XLA's compile, but each process
still traces and lowers its programs, seconds for a VGG objective inside an optimisation loop:
the start-up of every run and of every group job of a sweep. :func:`compile` returns
``jax.jit(fn, **jit).lower(*args).compile()``, or the executable stored under the same key in
``$NSTJAX_CACHE/programs/<sha256>.bin`` (written atomically: a JSON header with everything the
key is made of, then the executable serialised by ``jax.experimental.serialize_executable`` with
its argument and result trees, pickled). The key covers the program's name and structure (the
caller's description of what it traces: the network, the loss, the optimiser), the shapes, dtypes
and shardings of its arguments, the jit options, nstjax's own source (a digest of the package's
files), the versions of jax, jaxlib, flax and optax, jax's numeric flags, the devices and
``XLA_FLAGS``. A stored program whose header differs, or that cannot be read (truncated, written
by other versions), is compiled again, with a log line, and replaced.

The cache dir is the user's own, as JAX's compilation cache is: its files are trusted (unpickling
a program runs code). ``NSTJAX_PROGRAM_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from nstjax.atomic import atomic_path

log = logging.getLogger("nstjax")
MAGIC = b"nstjax-program-1\n"
FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_dtype_promotion", "jax_numpy_rank_promotion",
         "jax_default_prng_impl", "jax_threefry_partitionable")


@functools.cache
def source_digest() -> str:
    """sha256 of nstjax's own Python files (a program traced from other code is another program)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def environment() -> dict:
    """What else decides a compiled program: versions, numeric flags, devices, XLA_FLAGS."""
    versions = {}
    for name in ("jax", "jaxlib", "flax", "optax"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    devices = jax.devices()
    return {"nstjax_source": source_digest(), "versions": versions,
            "flags": {f: str(getattr(jax.config, f, None)) for f in FLAGS},
            "platform": devices[0].platform, "platform_version": devices[0].client.platform_version,
            "devices": [f"{d.id}:{d.device_kind}" for d in devices], "xla_flags": os.environ.get("XLA_FLAGS", "")}


def signature(args: Sequence) -> dict:
    """The arguments' tree, and each leaf's shape, dtype and sharding."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    return {"tree": str(tree), "leaves": [[list(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)),
                                           repr(getattr(x, "sharding", None))] for x in leaves]}


def cache_root() -> Path | None:
    if os.environ.get("NSTJAX_PROGRAM_CACHE", "1") == "0":
        return None
    from nstjax.weights import cache_dir

    return cache_dir() / "programs"


def _load(path: Path, header: dict, name: str):
    """The executable stored at ``path`` if its header is ``header``; None if there is none; a log
    line and None if it cannot be used."""
    from jax.experimental import serialize_executable

    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            if f.readline() != MAGIC:
                raise ValueError("not a stored program")
            stored = json.loads(f.readline())
            if stored != header:
                raise ValueError("written for another structure or other versions")
            payload, in_tree, out_tree = pickle.load(f)
        return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    except Exception as e:  # noqa: BLE001 (anything unreadable is compiled again)
        log.info("the stored program %s (%s) cannot be used (%s): compiling it again", name, path.name,
                 str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def _store(path: Path, header: dict, compiled) -> None:
    from jax.experimental import serialize_executable

    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
        data = pickle.dumps((payload, in_tree, out_tree))
    except Exception as e:  # noqa: BLE001 (e.g. a program with host callbacks): not stored
        log.debug("program not stored: %s", e)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + data)
    except OSError as e:  # a cache that cannot be written costs the next run its compile, nothing else
        log.debug("program not stored: %s", e)


@contextlib.contextmanager
def _without_xla_cache(off: bool):
    """JAX's persistent compilation cache turned off (for every thread) while compiling programs
    that this cache keeps."""
    before = jax.config.jax_enable_compilation_cache
    if off:
        jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)


def compile_many(specs: Sequence[tuple[str, Callable, Callable[[], Sequence], Sequence, dict, Any]]) -> list:
    """Each ``(name, fn, args, signature_args, jit_kwargs, structure)`` compiled, or loaded from the
    cache. ``args()`` gives the arguments to lower with (called only for a program not stored);
    ``signature_args`` the arguments whose shapes, with ``structure`` (anything whose repr names
    what ``fn`` traces beyond its arguments; None: not cached), determine the program. The ones to
    compile are lowered one after another and compiled side by side (XLA compiles each on one
    thread, outside the GIL)."""
    root = cache_root()
    env = environment() if root is not None else None
    out, todo = [None] * len(specs), []
    for i, (name, fn, args, signature_args, jit_kwargs, structure) in enumerate(specs):
        path = header = None
        if root is not None and structure is not None:
            header = {"name": name, "structure": repr(structure), "signature": signature(signature_args),
                      "jit": repr(sorted(jit_kwargs.items())), **env}
            digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
            path = root / f"{digest}.bin"
            out[i] = _load(path, header, name)
        if out[i] is None:
            todo.append((i, jax.jit(fn, **jit_kwargs).lower(*args()), path, header))
    if todo:
        # Compiled here, not loaded from XLA's compilation cache: an executable loaded from there and
        # serialised again loses its functions on XLA:CPU ("Function ... not found" when run).
        with _without_xla_cache(any(t[2] is not None for t in todo)), ThreadPoolExecutor(len(todo)) as pool:
            compiled = list(pool.map(lambda t: t[1].compile(), todo))
        for (i, _, path, header), c in zip(todo, compiled):
            out[i] = c
            if path is not None:
                _store(path, header, c)
    return out


def compile(name: str, fn: Callable, args: Sequence, structure: Any = None, **jit_kwargs):
    """``jax.jit(fn, **jit_kwargs).lower(*args).compile()``, or the same program stored by an earlier
    process (see the module); ``args`` may be arrays or ``jax.ShapeDtypeStruct`` s."""
    return compile_many([(name, fn, lambda: args, args, jit_kwargs, structure)])[0]


def cached_jit(name: str, fn: Callable, structure: Any) -> Callable:
    """``jax.jit(fn)`` whose programs, one per signature of the arguments, are kept across
    processes as :func:`compile`'s."""
    seen: dict[str, Any] = {}

    def call(*args):
        key = json.dumps(signature(args))
        if key not in seen:
            seen[key] = compile(name, fn, args, structure)
        return seen[key](*args)

    return call
