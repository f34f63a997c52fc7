"""Hydra composition: presets, typed keys, errors that name the key."""

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, ListConfig, OmegaConf
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


def _config_reference():
    """docs/_ext/config_reference.py, the generator of the docs' config reference (no Sphinx needed)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "docs" / "_ext" / "config_reference.py"
    spec = importlib.util.spec_from_file_location("config_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_documents_every_key_and_no_other():
    """The docs' config reference is generated from the schema; config_meanings.yaml explains
    every key of it and nothing else (a key added, removed or renamed fails here and the build)."""
    ref = _config_reference()
    keys, meanings = ref.check()
    names = [k.name for k in keys]
    assert len(names) == len(set(names)) and {"loss.beta", "optim.memory_size", "optim.b1",
                                               "regions[i].weight", "model.preprocessing.scale"} <= set(names)
    table = ref.table()
    assert all(f"| `{n}` |" in table for n in names)
    missing, stale = dict(meanings), {**meanings, "loss.bta": "a key that is not there"}
    del missing["loss.beta"]
    assert ref.problems(keys, missing) == ["loss.beta: a key of nstjax/config.py without a meaning in "
                                           "config_meanings.yaml"]
    assert ref.problems(keys, stale) == ["loss.bta: a meaning in config_meanings.yaml for a key "
                                         "nstjax/config.py does not have"]
    page = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert "```{config-reference}\n```" in page  # the whole reference is on the page


def test_config_reference_defaults_are_what_a_run_composes():
    """Each default the reference shows is the composed config's (the schema's, the default group
    files', configs/config.yaml's), with each optimiser; the choices shown are the Enum's."""
    ref = _config_reference()
    cfgs = {opt: composed(f"optim={opt}") for opt in config.OPTIM_SCHEMAS}
    for key in ref.schema_keys():
        if "[i]" in key.name:  # a list item's key: no item in the default config
            continue
        for opt, default in key.defaults.items():
            value = OmegaConf.select(cfgs[opt], key.name)
            if isinstance(value, (DictConfig, ListConfig)):
                value = OmegaConf.to_container(value)
            assert ref.value_words(value) == ref.value_words(default), key
    assert "one of `gram`, `mean_std`, `mmd`" in next(k.type for k in ref.schema_keys() if k.name == "loss.style_loss")
