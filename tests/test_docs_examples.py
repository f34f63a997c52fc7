"""The examples of README.md and docs/*.md run, and the docs list what exists.

Every ```python block runs, each page's blocks in order in one namespace, as a reader runs them:
in a folder where ``photo.jpg`` and ``painting.jpg`` are the bundled Tübingen and Starry Night,
with every config they compose (``nstjax.config.compose``, which ``nstjax.stylize``,
``nstjax.sweep`` and the blocks' own calls go through) run on synthetic weights at 32 px for 2
steps. Every ``python -m nstjax.run …`` command of their shell blocks is composed and parsed as
the CLI parses it, each point of a ``-m`` sweep, without running it.
"""

import itertools
import re
import shlex
import shutil
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from cli import EXAMPLES, ROOT
from nstjax import api, config
from nstjax.spec import parse

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELLS = ("bash", "shell", "sh", "console")
IMAGES = {"photo.jpg": "tubingen.jpg", "painting.jpg": "starry_night.jpg"}
TINY = ["image.size=32", "optim.steps=2", "model.conv=direct", "progress=false"]


def blocks(page: Path, languages) -> list[tuple[int, str]]:
    """(line, code) of each fenced block of ``page`` in one of ``languages``."""
    text = page.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text)
            if m.group(1) in languages]


def commands(page: Path) -> list[tuple[str, list[str]]]:
    """(where, arguments) of each ``python -m nstjax.run`` in ``page``'s shell blocks: continued
    lines joined, comments and prompts dropped, ``&&`` chains split."""
    found = []
    for start, code in blocks(page, SHELLS):
        lines, i = code.splitlines(), 0
        while i < len(lines):
            first, line = i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i]
            i += 1
            for part in line.removeprefix("$ ").split("&&"):
                words = shlex.split(part, comments=True)
                if "nstjax.run" in words and words[words.index("nstjax.run") - 1] == "-m":
                    found.append((f"{page.relative_to(ROOT)}:{start + 1 + first}",
                                  words[words.index("nstjax.run") + 1:]))
    return found


def points(arguments: list[str]) -> list[list[str]]:
    """The overrides of each run a command makes: one, or with ``-m`` the product of its sweeps
    (comma lists, range(), choice(), group choices), as Hydra's sweepers expand them."""
    multirun = any(a in ("-m", "--multirun") for a in arguments)
    overrides = OverridesParser.create().parse_overrides([a for a in arguments if a not in ("-m", "--multirun")])
    if not multirun:
        assert not any(o.is_sweep_override() for o in overrides), "a sweep without -m"
        return [[o.input_line for o in overrides]]
    choices = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in overrides]
    return [list(p) for p in itertools.product(*choices)]


PYTHON_PAGES = [p for p in PAGES if blocks(p, ("python",))]
COMMANDS = [c for p in PAGES for c in commands(p)]


def test_the_examples_are_found():
    """The pages that promise Python examples have them, and the commands are read."""
    names = {str(p.relative_to(ROOT)) for p in PYTHON_PAGES}
    assert {"README.md", "docs/python-api.md", "docs/tutorial.md"} <= names
    where = {w.split(":")[0] for w, _ in COMMANDS}
    assert {"README.md", "docs/sweeps.md", "docs/video.md", "docs/controls.md"} <= where
    assert ["+experiment=preview"] in [args for _, args in COMMANDS]  # README's first command


@pytest.fixture
def reader(monkeypatch, tmp_path, synthetic_weights_file):
    """A reader's folder with photo.jpg and painting.jpg, where every composed config is tiny."""
    import matplotlib

    matplotlib.use("Agg")
    for name, example in IMAGES.items():
        shutil.copyfile(EXAMPLES / example, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    compose = config.compose
    tiny = [f"model.weights={synthetic_weights_file}", *TINY]
    monkeypatch.setattr(config, "compose", lambda overrides=(): compose([*overrides, *tiny]))
    return tmp_path


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
@pytest.mark.slow
def test_python_blocks_run(page, reader):
    namespace = {"__name__": "__main__"}
    for line, code in blocks(page, ("python",)):
        exec(compile(code, f"{page}:{line}", "exec"), namespace)
    results = [v for v in namespace.values() if isinstance(v, api.Result)]
    results += [r for v in namespace.values() if isinstance(v, api.SweepResult) for r in v.results]
    assert results, f"{page.name}'s examples made no result"
    assert all(r.metrics["status"] == "finished" and r.metrics["steps"] == 2 for r in results)


@pytest.mark.parametrize("where, arguments", COMMANDS, ids=[w for w, _ in COMMANDS])
@pytest.mark.slow
def test_commands_compose(where, arguments):
    """Each run of the command composes (the schema, the presets, Hydra's own keys) and parses
    (every value checked, as before a run)."""
    for overrides in points(arguments):
        parse(config.compose(overrides))


def test_a_sweep_is_each_of_its_points():
    swept = points(["-m", "+experiment=preview", "loss.beta=1e3,1e4", "seed=range(2)", "optim=adam,lbfgs"])
    assert len(swept) == 8 and swept[0] == ["+experiment=preview", "loss.beta=1000.0", "seed=0", "optim=adam"]
    assert points(["loss.beta=1e3"]) == [["loss.beta=1e3"]]


def test_architecture_lists_every_module():
    """docs/architecture.md has one row per module of nstjax/ and none that is gone."""
    listed = re.findall(r"^\| `(nstjax/[\w/.]+)` \|", (ROOT / "docs" / "architecture.md").read_text(), re.M)
    package = ROOT / "nstjax"
    modules = {f"nstjax/{p.name}" for p in package.glob("*.py") if p.name != "__init__.py"}
    modules |= {f"nstjax/{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    assert sorted(listed) == sorted(modules)
