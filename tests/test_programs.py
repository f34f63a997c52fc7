"""Compiled programs kept across processes (nstjax.programs): a later process loads them without
tracing and gets bitwise the same results; a damaged or stale entry is compiled again."""

import json
import logging
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from nstjax import programs

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from nstjax import programs

    traced, hits = [], []
    jax.monitoring.register_event_listener(
        lambda event, **_: hits.append(1) if event == "/jax/compilation_cache/cache_hits" else None)
    programs.enable_compilation_cache()  # as the CLI does: on a CPU only with NSTJAX_CPU_XLA_CACHE=1

    def step(x, w):
        traced.append(1)  # runs only while tracing
        return {"y": jnp.tanh(x @ w).sum(axis=0), "n": jnp.int32(3)}

    x = jnp.asarray(np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4))
    w = jnp.asarray(np.linspace(0, 2, 20, dtype=np.float32).reshape(4, 5))
    out = programs.compile("step", step, (x, w), structure=sys.argv[1])(x, w)
    print(json.dumps({"traced": len(traced), "y": np.asarray(out["y"]).tolist(), "n": int(out["n"]),
                      "xla_cache_hits": len(hits)}))
""")


def _run(cache, structure="tanh-step", **env):
    env_vars = {"NSTJAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu", **env}
    import os

    base = {k: v for k, v in os.environ.items() if k != "NSTJAX_CPU_XLA_CACHE"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, structure], env={**base, **env_vars},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.slow
def test_a_second_process_loads_the_program_without_tracing(tmp_path):
    first, _ = _run(tmp_path)
    stored = list((tmp_path / "programs").glob("*.bin"))
    assert first["traced"] == 1 and len(stored) == 1
    second, _ = _run(tmp_path)
    assert second["traced"] == 0 and second["y"] == first["y"] and second["n"] == 3  # bitwise
    other, _ = _run(tmp_path, "another structure")
    assert other["traced"] == 1 and len(list((tmp_path / "programs").glob("*.bin"))) == 2
    assert not (tmp_path / "xla").exists() and first["xla_cache_hits"] == second["xla_cache_hits"] == 0


def test_on_a_cpu_xla_keeps_the_compiled_programs_only_when_asked(tmp_path):
    """NSTJAX_CPU_XLA_CACHE=1: the first process writes XLA's executables to $NSTJAX_CACHE/xla, the
    second loads them (JAX's cache-hit event) without tracing, bitwise the same result."""
    first, _ = _run(tmp_path, NSTJAX_CPU_XLA_CACHE="1")
    assert first["xla_cache_hits"] == 0 and any((tmp_path / "xla").iterdir())
    second, _ = _run(tmp_path, NSTJAX_CPU_XLA_CACHE="1")
    assert second["xla_cache_hits"] >= 1 and second["traced"] == 0 and second["y"] == first["y"]


def _store_one(tmp_path, monkeypatch):
    """A program stored in a fresh cache; ``make()`` gives a new function object each time (jit's
    in-process trace cache is per function), counting its traces in ``traced``."""
    monkeypatch.setenv("NSTJAX_CACHE", str(tmp_path))
    traced = []

    def make():
        def double(x):
            traced.append(1)
            return 2 * x
        return double

    x = jnp.arange(6.0)
    np.testing.assert_array_equal(np.asarray(programs.compile("double", make(), (x,), "double")(x)), 2 * np.arange(6.0))
    [path] = (tmp_path / "programs").glob("*.bin")
    assert len(traced) == 1
    programs.forget()  # as a new process
    programs.compile("double", make(), (x,), "double")
    assert len(traced) == 1  # loaded, not traced
    programs.forget()
    return make, x, traced, path


def test_a_truncated_entry_is_compiled_again_with_a_log_line(tmp_path, monkeypatch, caplog):
    make, x, traced, path = _store_one(tmp_path, monkeypatch)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.INFO, logger="nstjax"):
        out = programs.compile("double", make(), (x,), "double")(x)
    np.testing.assert_array_equal(np.asarray(out), 2 * np.arange(6.0))
    assert len(traced) == 2 and "cannot be used" in caplog.text and "tracing it again" in caplog.text
    programs.forget()
    programs.compile("double", make(), (x,), "double")
    assert len(traced) == 2  # the entry was replaced by a whole one


def test_an_entry_of_other_versions_is_never_used(tmp_path, monkeypatch, caplog):
    make, x, traced, path = _store_one(tmp_path, monkeypatch)
    magic, header, payload = path.read_bytes().split(b"\n", 2)
    stale = json.loads(header)
    stale["versions"]["jaxlib"] = "0.0.1"  # as a file written by another jaxlib under this name would say
    path.write_bytes(magic + b"\n" + json.dumps(stale, sort_keys=True).encode() + b"\n" + payload)
    with caplog.at_level(logging.INFO, logger="nstjax"):
        programs.compile("double", make(), (x,), "double")
    assert len(traced) == 2 and "written for another structure or other versions" in caplog.text


def test_the_key_covers_source_shapes_and_structure(monkeypatch, tmp_path):
    monkeypatch.setenv("NSTJAX_CACHE", str(tmp_path))
    a, b = jnp.zeros((2, 3)), jnp.zeros((2, 4))
    assert programs.signature((a,)) != programs.signature((b,))
    env = programs.environment()
    assert env["nstjax_source"] == programs.source_digest() and len(env["nstjax_source"]) == 64
    assert {"jax", "jaxlib", "flax", "optax"} <= set(env["versions"])
    monkeypatch.setenv("NSTJAX_PROGRAM_CACHE", "0")
    assert programs.cache_root() is None
    programs.compile("noop", lambda x: x + 1, (a,), "noop")
    assert not (tmp_path / "programs").exists()


@pytest.mark.parametrize("members", ["vmap", "map"])
@pytest.mark.slow
def test_a_loaded_loop_program_gives_the_compiled_ones_result(members, tmp_path, monkeypatch, synthetic_weights_file):
    """The optimisation's own programs (Loop.compile with a structure): compiled, then loaded in
    this process from the stored file, run to bitwise the same state."""
    from nstjax import build, config
    from nstjax.spec import parse

    monkeypatch.setenv("NSTJAX_CACHE", str(tmp_path))
    cfg = config.compose([f"model.weights={synthetic_weights_file}", "image.size=32", "model.conv=direct",
                          "loss.style_layers=[relu1_1,relu2_1]", "loss.content_layers=[relu2_1]",
                          "optim.linesearch=none", f"member_batching={members}"])
    group = build.build_group([parse(cfg)])

    def run():
        program = group.loop.compile(group.problems, group.params, structure=group.program_key)
        state = program.init(group.problems, group.params)
        state, _, _ = program.chunk(state, group.problems, group.params, jnp.int32(3), jnp.int32(99))
        return np.asarray(state.pixels)

    compiled = run()
    names = sorted(json.loads(p.read_bytes().split(b"\n")[1])["name"] for p in (tmp_path / "programs").glob("*.bin"))
    assert names == ["chunk", "init", "targets", "yardstick_targets"]
    programs.forget()
    loaded = run()
    np.testing.assert_array_equal(loaded, compiled)
