"""The config reference, generated from nstjax's structured config (nstjax/config.py).

Every key of the schema (the dataclasses registered in Hydra's ConfigStore) with its type, its
default and, for an Enum, its choices; the config groups from the config files
(nstjax.configs); and each key's meaning from ``docs/config_meanings.yaml``, the one place where
keys are explained. A key of the schema without a meaning, or a meaning for a key the schema
does not have, fails the build (and tests/test_config.py).

In a page::

    ```{config-reference}
    ```

lists every key; ``:keys: pyramid regions`` only the keys under those names. ``{config-groups}``
lists the groups. The module imports Sphinx only in :func:`setup`, so the tests read it without.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from nstjax import config

MEANINGS = Path(__file__).resolve().parents[1] / "config_meanings.yaml"
"""Each key's meaning: ``key: text`` (MyST Markdown)."""


class Key(NamedTuple):
    """One key of the schema: its dotted name (``regions[i].mask`` for a list item's key), its type
    as words (an Enum's choices included) and its default per optimiser schema (``optim=lbfgs``,
    ``optim=adam``) that has it."""

    name: str
    type: str
    defaults: dict[str, Any]


def _type_words(hint) -> str:
    """A type annotation of the schema in words: ``one of `a`, `b``` for an Enum."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return f"{_type_words(inner)}, or null"
    if typing.get_origin(hint) is list:
        inner = _type_words(args[0])
        return f"list of ({inner})" if " or " in inner or inner.startswith("one of") else f"list of {inner}"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(f"`{m.name}`" for m in hint)
    if dataclasses.is_dataclass(hint):
        return "{" + ", ".join(f.name for f in dataclasses.fields(hint)) + "}"
    if hint is Any:
        return "any"
    return {bool: "bool", int: "int", float: "float", str: "string"}[hint]


def _walk(node, prefix: str = ""):
    """(name, type annotation, default) of each leaf of a schema instance, nested configs walked
    into; a list of configs (``regions``) is a key itself, and its item's keys follow as
    ``name[i].key``."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        hint, value, name = hints[f.name], getattr(node, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from _walk(value, name + ".")
            continue
        yield name, hint, value
        item = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
        if typing.get_origin(item) is list and dataclasses.is_dataclass(typing.get_args(item)[0]):
            yield from _walk(typing.get_args(item)[0](), name + "[i].")


def default_choices() -> dict[str, str]:
    """The group choices of the default config (configs/config.yaml's defaults list)."""
    root = resources.files("nstjax.configs")
    chosen = {}
    for entry in yaml.safe_load(root.joinpath("config.yaml").read_text(encoding="utf-8"))["defaults"]:
        if isinstance(entry, dict):
            chosen.update({k: v for k, v in entry.items() if not k.startswith("override ")})
    return chosen


def schema_keys() -> list[Key]:
    """Every key of the schema, in the schema's order: the top-level config's, then the keys of
    each optimiser's schema (``optim.*``), each with the defaults of the optimisers that have it
    (the default config's optimiser first)."""
    first = default_choices()["optim"]
    keys: dict[str, Key] = {}
    for optimiser, schema in sorted(config.OPTIM_SCHEMAS.items(), key=lambda item: item[0] != first):
        for name, hint, default in _walk(config.Config(optim=schema())):
            known = keys.setdefault(name, Key(name, _type_words(hint), {}))
            known.defaults[optimiser] = default
    return list(keys.values())


def load_meanings(path: Path = MEANINGS) -> dict[str, str]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def problems(keys: list[Key], meanings: dict[str, str]) -> list[str]:
    """What keeps the reference from documenting exactly the schema: keys without a meaning,
    meanings of keys the schema does not have, empty meanings."""
    names = [k.name for k in keys]
    out = [f"{n}: a key of nstjax/config.py without a meaning in {MEANINGS.name}"
           for n in names if n not in meanings]
    out += [f"{n}: a meaning in {MEANINGS.name} for a key nstjax/config.py does not have"
            for n in meanings if n not in names]
    out += [f"{n}: an empty meaning in {MEANINGS.name}" for n, text in meanings.items()
            if not (isinstance(text, str) and text.strip())]
    return out


def check() -> tuple[list[Key], dict[str, str]]:
    """The keys and their meanings; a ValueError naming every problem when they do not match."""
    keys, meanings = schema_keys(), load_meanings()
    found = problems(keys, meanings)
    if found:
        raise ValueError("the config reference does not match the schema:\n  " + "\n  ".join(found))
    return keys, meanings


def value_words(value) -> str:
    """A default as a config file or an override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_words(v) for v in value) + "]"
    return str(value)


def default_words(key: Key) -> str:
    """One default, or each optimiser's where they differ or only some optimisers have the key."""
    shown = {opt: f"`{value_words(v)}`" for opt, v in key.defaults.items()}
    if len(shown) == len(config.OPTIM_SCHEMAS) and len(set(shown.values())) == 1:
        return next(iter(shown.values()))
    return ", ".join(f"{v} (`optim={opt}`)" for opt, v in shown.items())


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def selected(keys: list[Key], names: list[str]) -> list[Key]:
    """The keys under any of ``names`` (``pyramid``: pyramid.*; ``regions``: regions, regions[i].*);
    all keys when ``names`` is empty."""
    if not names:
        return keys
    chosen = [k for k in keys if any(k.name == n or k.name.startswith((n + ".", n + "[")) for n in names)]
    if not chosen:
        raise ValueError(f"no config key under {', '.join(names)}")
    return chosen


def table(names: list[str] = ()) -> str:
    """The reference as a Markdown table: key, type (and choices), default, meaning."""
    keys, meanings = check()
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for k in selected(keys, list(names)):
        rows.append(f"| `{k.name}` | {_cell(k.type)} | {_cell(default_words(k))} | {_cell(meanings[k.name])} |")
    return "\n".join(rows)


def groups() -> str:
    """The config groups as a Markdown table: each group's choices (its files) and the default
    config's choice (configs/config.yaml's defaults list)."""
    root, chosen = resources.files("nstjax.configs"), default_choices()
    rows = ["| group | choices | default |", "| --- | --- | --- |"]
    for group in sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")):
        files = sorted(f.name.removesuffix(".yaml") for f in root.joinpath(group).iterdir() if f.name.endswith(".yaml"))
        default = f"`{chosen[group]}`" if group in chosen else "none"
        rows.append(f"| `{group}` | {', '.join(f'`{f}`' for f in files)} | {default} |")
    return "\n".join(rows)


def setup(app):
    from docutils import nodes
    from docutils.parsers.rst import directives
    from docutils.statemachine import StringList
    from sphinx.errors import ExtensionError
    from sphinx.util.docutils import SphinxDirective

    class Generated(SphinxDirective):
        """A Markdown table made from the schema, parsed as the page's own text."""

        def markdown(self) -> str:
            raise NotImplementedError

        def run(self):
            for path in (MEANINGS, Path(config.__file__), Path(__file__)):
                self.env.note_dependency(str(path))
            try:
                text = self.markdown()
            except ValueError as e:
                raise self.error(str(e)) from None
            node = nodes.container()
            self.state.nested_parse(StringList(text.splitlines(), source=self.get_source_info()[0]),
                                    self.content_offset, node)
            return node.children

    class ConfigReference(Generated):
        option_spec = {"keys": directives.unchanged}

        def markdown(self) -> str:
            return table(self.options.get("keys", "").split())

    class ConfigGroups(Generated):
        def markdown(self) -> str:
            return groups()

    def check_meanings(app):
        try:
            check()
        except ValueError as e:
            raise ExtensionError(str(e)) from None

    app.add_directive("config-reference", ConfigReference)
    app.add_directive("config-groups", ConfigGroups)
    app.connect("builder-inited", check_meanings)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
