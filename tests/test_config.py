"""Hydra composition: presets, typed keys, errors that name the key."""

from importlib import resources

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

from nstjax import config
from nstjax.losses import HParams
from nstjax.errors import UserError
from nstjax.spec import parse

config.register()
PRESETS = ["gatys2016", "pytorch_tutorial", "tf_tutorial", "neural_style", "preview"]


def loss_spec(cfg):
    return parse(cfg).structure.loss


def hparams(cfg):
    point = parse(cfg)
    return point.member.hparams(point.structure.loss)


def optim_spec(cfg):
    return parse(cfg).structure.optim


def composed(*overrides):
    with initialize_config_module("nstjax.configs", version_base=None):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_builds_the_objective(preset):
    cfg = composed(f"+experiment={preset}")
    hp = hparams(cfg)
    ospec = optim_spec(cfg)
    assert isinstance(hp, HParams)
    assert ospec.name == cfg.optim.name
    for key in ("content", "style", "init", "seed", "save_every"):
        assert key in cfg
    for key in ("image.size", "image.style_scale", "model.weights", "model.pooling",
                "loss.content_layers", "loss.style_layers", "loss.style_layer_weights",
                "loss.alpha", "loss.beta", "loss.tv_weight", "optim.steps", "optim.lr"):
        assert OmegaConf.select(cfg, key) is not None or key == "loss.style_layer_weights", key


def test_gatys2016_is_the_seed():
    cfg = composed("+experiment=gatys2016")
    assert cfg.model.weights == "vgg19" and cfg.model.pooling.value == "avg"
    assert list(cfg.loss.content_layers) == ["relu4_2"]
    assert list(cfg.loss.style_layers) == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    assert cfg.loss.style_layer_weights is None  # 1/L each: 1/5
    np.testing.assert_allclose(hparams(cfg).style_layer_weights, [0.2] * 5)
    assert (cfg.loss.alpha, cfg.loss.beta) == (1.0, 1e4)
    assert cfg.loss.style_reduction.value == "gatys" and cfg.loss.gram_norm.value == "none"
    assert cfg.loss.content_reduction.value == "half_sum"
    assert cfg.optim.name == "lbfgs" and cfg.init == "content"


def test_presets_reproduce_their_sources():
    torch_tut = composed("+experiment=pytorch_tutorial")
    assert torch_tut.model.weights == "vgg19-torchvision"
    assert (torch_tut.loss.beta, torch_tut.optim.max_evaluations) == (1e6, 300)
    assert torch_tut.optim.linesearch.value == "none"
    tf_tut = composed("+experiment=tf_tutorial")
    assert tf_tut.optim.name == "adam" and tf_tut.optim.epsilon_hat
    assert (tf_tut.optim.lr, tf_tut.optim.b1, tf_tut.optim.eps, tf_tut.optim.steps) == (0.02, 0.99, 0.1, 1000)
    assert (tf_tut.loss.alpha, tf_tut.loss.beta) == (1e4, 1e-2)
    ns = composed("+experiment=neural_style")
    assert (ns.loss.alpha, ns.loss.beta, ns.init, ns.model.pooling.value) == (5.0, 100.0, "noise", "max")


@pytest.mark.parametrize("optim", ["adam", "lbfgs"])
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_with_either_optimiser(preset, optim):
    """optim=NAME after a preset replaces the preset's optimiser settings with NAME's
    defaults and keeps every other setting of the preset, and the optim keys that the preset
    sets for any optimiser (in its own file: neural_style's clip)."""
    alone = OmegaConf.to_container(composed(f"+experiment={preset}"), resolve=True, enum_to_str=True)
    cfg = composed(f"+experiment={preset}", f"optim={optim}")
    swapped = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    plain = OmegaConf.to_container(composed(f"optim={optim}").optim, resolve=True, enum_to_str=True)
    preset_file = resources.files("nstjax.configs").joinpath("experiment", f"{preset}.yaml")
    assert swapped.pop("optim") == {**plain, **(OmegaConf.load(str(preset_file)).get("optim") or {})}
    alone.pop("optim")
    assert swapped == alone
    assert optim_spec(cfg).name == optim


def test_optimiser_is_a_group():
    assert composed("optim=adam").optim.name == "adam"
    cfg = composed("optim=lbfgs", "optim.memory_size=7", "optim.linesearch=none")
    assert cfg.optim.memory_size == 7 and optim_spec(cfg).linesearch == "none"


def test_unknown_key_and_wrong_type_name_the_key():
    with pytest.raises(Exception) as info:
        composed("loss.bta=1")
    assert isinstance(info.value.__cause__, ConfigAttributeError)
    assert "loss.bta" in str(info.value.__cause__)
    with pytest.raises(Exception) as info:
        composed("model.pooling=median")
    assert isinstance(info.value.__cause__, ValidationError)
    assert "model.pooling" in str(info.value.__cause__)
    with pytest.raises(Exception) as info:
        composed("optim=adam", "optim.memory_size=3")  # an L-BFGS key under Adam
    assert "memory_size" in str(info.value.__cause__)


@pytest.mark.parametrize("mode,pixels,expected", [
    ("auto", 2048 * 2048 - 1, False), ("auto", 2048 * 2048, True), ("on", 16, True), ("off", 10**8, False)])
def test_remat_mode_and_threshold(mode, pixels, expected):
    cfg = composed(f"model.remat={mode}")
    assert parse(cfg).structure.model.uses_remat((pixels, 1, 3)) is expected


def test_style_layers_alone_take_equal_weights():
    cfg = composed("loss.style_layers=[relu1_1,relu3_1]")
    hp = hparams(cfg)
    np.testing.assert_allclose(hp.style_layer_weights, [0.5, 0.5])  # 1/L for the layers given
    cfg = composed("+experiment=neural_style", "loss.style_layers=[relu1_1,relu3_1]")  # a preset's own: 5 values
    with pytest.raises(UserError, match="style_layer_weights has 5 values for 2 layers"):
        hparams(cfg)


@pytest.mark.parametrize("arch, bad, good", [("vgg16", "relu3_4", "relu3_3"), ("vgg11", "relu1_2", "relu4_2"),
                                             ("vgg13", "conv5_3", "conv5_2")])
def test_layers_of_the_chosen_network(arch, bad, good):
    assert loss_spec(composed(f"model.arch={arch}", f"loss.content_layers=[{good}]")).content_layers == (good,)
    with pytest.raises(UserError) as e:
        loss_spec(composed(f"model.arch={arch}", f"loss.content_layers=[{bad}]"))
    assert f"unknown {arch.upper()} layer '{bad}'" in str(e.value) and good in str(e.value)


def test_weights_of_another_network_are_refused_naming_both():
    from nstjax.build import check_arch

    with pytest.raises(UserError, match="model.weights=vgg16 holds a VGG16, model.arch is vgg19: set model.arch=vgg16"):
        check_arch(parse(composed("model.weights=vgg16")).structure.model, "vgg16")
    check_arch(parse(composed("model=vgg16")).structure.model, "vgg16")
    with pytest.raises(UserError, match="holds a VGG19, model.arch is vgg16"):
        check_arch(parse(composed("model.arch=vgg16")).structure.model, "vgg19")


def test_unknown_arch_lists_the_choices():
    with pytest.raises(Exception) as info:
        composed("model.arch=vgg18")
    message = str(info.value.__cause__)
    assert isinstance(info.value.__cause__, ValidationError) and "model.arch" in message
    assert all(a in message for a in ("vgg11", "vgg13", "vgg16", "vgg19"))


def _readme_config_table() -> dict[str, str]:
    """README's config reference: each key with the default written beside it."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Config reference"):text.index("## Style losses")]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        keys = [k.strip("` ") for k in cells[0].split(",")]
        defaults = [cells[1]] if len(keys) == 1 else [d.strip() for d in cells[1].split(", ")]
        defaults = defaults * len(keys) if len(defaults) == 1 else defaults  # one default for all of them
        assert len(defaults) == len(keys), line
        rows.update(zip(keys, defaults))
    return rows


def _readme_value(text: str):
    """A default as the README writes it: `x`, 10⁴, null (meaning), true, [a, …, b]."""
    text = text.replace("`", "").split(" (")[0].strip()
    if text in ("null", "unset", "bundled examples"):
        return None
    if text in ("true", "false"):
        return text == "true"
    if text.startswith("["):
        return [_readme_value(v.strip()) for v in text.strip("[]").split(",")] if text != "[]" else []
    try:
        return float(text.replace("10⁴", "1e4"))
    except ValueError:
        return text


def _same(readme, schema) -> bool:
    schema = getattr(schema, "value", schema)
    if isinstance(readme, list):  # [first, …, last] or the whole list
        schema = list(schema)
        return readme == schema or (readme[1] == "…" and [readme[0], readme[-1]] == [schema[0], schema[-1]])
    if isinstance(readme, float) and not isinstance(schema, bool) and isinstance(schema, (int, float)):
        return readme == schema
    return readme == schema


def test_readme_config_table_is_the_schema():
    """Every key of the README's config reference exists with the default it shows (``A / B``:
    L-BFGS's / Adam's), and every key of the schema is in the table."""
    import dataclasses

    rows = _readme_config_table()
    schemas = {"lbfgs": config.Config(optim=config.LBFGSConfig()), "adam": config.Config(optim=config.AdamConfig())}

    def default(schema, key):
        node = schema
        for part in ("optim.name" if key == "optim" else key).split("."):
            node = getattr(node, part)
        return node

    for key, written in rows.items():
        parts = written.split(" / ")
        if len(parts) == 1:  # the default config's (optim=lbfgs), or Adam's for its own keys
            has = hasattr(schemas["lbfgs"].optim, key.split(".")[-1]) or not key.startswith("optim.")
            pairs = [("lbfgs" if has else "adam", written)]
        else:
            pairs = list(zip(("lbfgs", "adam"), parts))
        for name, part in pairs:
            if key == "model.preprocessing":
                assert _readme_value(part) is None and not any(dataclasses.asdict(default(schemas[name], key)).values())
                continue
            assert _same(_readme_value(part), default(schemas[name], key)), (key, written)

    def leaves(node, prefix=""):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value) and f.name != "preprocessing":
                yield from leaves(value, f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    keys = {"optim" if k == "optim.name" else k for name in schemas for k in leaves(schemas[name])}
    assert keys - set(rows) == set()
