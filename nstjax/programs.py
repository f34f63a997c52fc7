"""Programs kept across processes: a program traced once for a structure is compiled by every
later process from its stored form, without tracing, in a fraction of a second.

JAX's persistent compilation cache (``$NSTJAX_CACHE/xla``) saves XLA's compile, but each process
still traces and lowers its programs, seconds for a VGG objective inside an optimisation loop:
the start-up of every run and of every group job of a sweep. :func:`compile` returns the compiled
call of a program exported once (``jax.export``: its StableHLO with its argument and result
trees) and stored in ``$NSTJAX_CACHE/programs/<sha256>.bin`` (written atomically: a JSON header
with everything the key is made of, the NamedTuple classes of its trees, then the serialised
export; no pickle); later processes deserialise it and compile its call, which XLA's persistent
cache answers. The key covers the program's name and structure (the caller's description of what
it traces: the network, the loss, the optimiser), the shapes, dtypes and shardings of its
arguments, the jit options, nstjax's own source (a digest of the package's files), the versions
of jax, jaxlib, flax and optax, jax's numeric flags, the devices and ``XLA_FLAGS``. A stored
program whose header differs, or that cannot be read (truncated, written by other versions), is
traced again, with a log line, and replaced. ``NSTJAX_PROGRAM_CACHE=0`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import jax

from nstjax.atomic import atomic_path

log = logging.getLogger("nstjax")
MAGIC = b"nstjax-program-2\n"
FLAGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_dtype_promotion", "jax_numpy_rank_promotion",
         "jax_default_prng_impl", "jax_threefry_partitionable")
_IN_PROCESS: dict[str, Any] = {}
"""The programs this process has compiled, by the path of their stored form."""


@functools.cache
def source_digest() -> str:
    """sha256 of nstjax's own Python files (a program traced from other code is another program)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def environment() -> dict:
    """What else decides a program: versions, numeric flags, devices, XLA_FLAGS."""
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


def _named_tuples(treedef) -> set[type]:
    """The NamedTuple classes among a pytree's nodes (jax.export serialises them by name)."""
    found, stack = set(), [treedef]
    while stack:
        node = stack.pop()
        data = node.node_data()
        if data is not None and isinstance(data[0], type) and issubclass(data[0], tuple) and hasattr(data[0], "_fields"):
            found.add(data[0])
        stack.extend(node.children())
    return found


def _register(classes: Sequence[str]) -> None:
    """Register NamedTuple classes (``module:qualname``) with jax.export's serialisation."""
    for path in classes:
        module, _, qualname = path.partition(":")
        cls = importlib.import_module(module)
        for part in qualname.split("."):
            cls = getattr(cls, part)
        try:
            jax.export.register_namedtuple_serialization(cls, serialized_name=path)
        except ValueError:  # registered already
            pass


def _load(path: Path, header: dict, name: str):
    """The export stored at ``path`` if its header is ``header``; None if there is none; a log line
    and None if it cannot be used."""
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            if f.readline() != MAGIC:
                raise ValueError("not a stored program")
            if json.loads(f.readline()) != header:
                raise ValueError("written for another structure or other versions")
            classes = json.loads(f.readline())
            blob = f.read()
        _register(classes)
        return jax.export.deserialize(bytearray(blob))
    except Exception as e:  # noqa: BLE001 (anything unreadable is traced again)
        log.info("the stored program %s (%s) cannot be used (%s): tracing it again", name, path.name,
                 str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def _store(path: Path, header: dict, exported) -> None:
    try:
        classes = sorted(f"{c.__module__}:{c.__qualname__}"
                         for c in _named_tuples(exported.in_tree) | _named_tuples(exported.out_tree))
        _register(classes)
        blob = bytes(exported.serialize())
    except Exception as e:  # noqa: BLE001 (e.g. a program with host callbacks): not stored
        log.debug("program not stored: %s", e)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + json.dumps(classes).encode()
                    + b"\n" + blob)
    except OSError as e:  # a cache that cannot be written costs the next run its tracing, nothing else
        log.debug("program not stored: %s", e)


def _abstract_args(exported, mesh) -> list:
    """The arguments an export was made for, as shapes and dtypes, placed on ``mesh`` as they were
    when it was exported over several devices."""
    shardings = exported.in_shardings_jax(mesh) if exported.nr_devices > 1 else [None] * len(exported.in_avals)
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for a, s in zip(exported.in_avals, shardings)]
    args, _ = jax.tree_util.tree_unflatten(exported.in_tree, avals)
    return list(args)


def compile_many(specs: Sequence[tuple[str, Callable, Callable[[], Sequence], Sequence, dict, Any]],
                 mesh=None) -> list:
    """Each ``(name, fn, args, signature_args, jit_kwargs, structure)`` compiled. ``args()`` gives
    the arguments to trace with (called only for a program not stored); ``signature_args`` the
    arguments whose shapes, with ``structure`` (anything whose repr names what ``fn`` traces beyond
    its arguments; None: not kept), determine the program. The programs are lowered one after
    another and compiled side by side (XLA compiles each on one thread, outside the GIL). ``mesh``:
    the devices a program traced over several of them runs on (the same axis names)."""
    root = cache_root()
    env = environment() if root is not None else None
    out, todo = [None] * len(specs), []
    for i, (name, fn, args, signature_args, jit_kwargs, structure) in enumerate(specs):
        if root is None or structure is None:
            todo.append((i, jax.jit(fn, **jit_kwargs).lower(*args()), None))
            continue
        header = {"name": name, "structure": repr(structure), "signature": signature(signature_args),
                  "jit": repr(sorted(jit_kwargs.items())), **env}
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()
        path = root / f"{digest}.bin"
        if str(path) in _IN_PROCESS:
            out[i] = _IN_PROCESS[str(path)]
            continue
        exported = _load(path, header, name)
        if exported is None:
            exported = jax.export.export(jax.jit(fn, **jit_kwargs))(*args())
            _store(path, header, exported)
        todo.append((i, jax.jit(exported.call, **jit_kwargs).lower(*_abstract_args(exported, mesh)), str(path)))
    if todo:
        with ThreadPoolExecutor(len(todo)) as pool:
            compiled = list(pool.map(lambda t: t[1].compile(), todo))
        for (i, _, key), c in zip(todo, compiled):
            out[i] = c
            if key is not None:
                _IN_PROCESS[key] = c
    return out


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in ``$NSTJAX_CACHE/xla`` with XLA's own caches (on GPUs
    the autotuning results and kernels, so that a sweep's later groups and later runs do not
    autotune again). On XLA:CPU only with ``NSTJAX_CPU_XLA_CACHE=1`` (every program kept, however
    short its compile): executables loaded from that cache once lost functions at dispatch
    ("Function ... not found", not reproduced since); by default the stored programs spare the
    tracing and XLA compiles once per process."""
    cpu = jax.default_backend() == "cpu"
    if cpu and os.environ.get("NSTJAX_CPU_XLA_CACHE") != "1":
        return
    from nstjax.weights import cache_dir

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0 if cpu else 1.0)
    if hasattr(jax.config, "jax_persistent_cache_enable_xla_caches"):
        jax.config.update("jax_persistent_cache_enable_xla_caches", "all")


def forget() -> None:
    """Forget the programs compiled in this process: the next :func:`compile` of each loads it from
    the cache dir again (as a new process would)."""
    _IN_PROCESS.clear()


def compile(name: str, fn: Callable, args: Sequence, structure: Any = None, mesh=None, **jit_kwargs):
    """``jax.jit(fn, **jit_kwargs).lower(*args).compile()``, from the program an earlier process
    stored where there is one (see the module); ``args`` may be arrays or ``jax.ShapeDtypeStruct`` s."""
    return compile_many([(name, fn, lambda: args, args, jit_kwargs, structure)], mesh)[0]


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
