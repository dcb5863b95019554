"""ctseg.utils.registry: the one name → object registry behind every ``register_*`` of ctseg."""

from __future__ import annotations

import pickle

import pytest

from ctseg.errors import ConfigError
from ctseg.utils.registry import Registry, UnknownNameError


def _reg() -> Registry[int]:
    reg: Registry[int] = Registry("widget")
    reg.add("beta", 2)
    reg.add("alpha", 1)
    return reg


def test_add_and_register_decorator_return_the_object() -> None:
    reg: Registry[object] = Registry("widget")

    @reg.register("f")
    def f() -> int:
        return 7

    assert f() == 7 and reg["f"] is f  # the decorator hands back the function itself
    obj = object()
    assert reg.add("o", obj) is obj and reg["o"] is obj


def test_mapping_behaviour_iteration_order_and_sorted_names() -> None:
    reg = _reg()
    assert list(reg) == ["beta", "alpha"]  # registration order (the CLI lists its commands so)
    assert reg.names() == ["alpha", "beta"] == sorted(reg)
    assert len(reg) == 2 and dict(reg.items()) == {"beta": 2, "alpha": 1}
    assert "alpha" in reg and "gamma" not in reg
    assert ["unhashable"] not in reg  # a list from a YAML config is simply not a name
    assert reg.get("gamma") is None and reg.get("gamma", 5) == 5 and reg.get("beta") == 2


def test_duplicate_name_is_a_value_error_naming_registry_and_name() -> None:
    reg = _reg()
    with pytest.raises(ValueError, match=r"widget 'alpha' registered twice"):
        reg.add("alpha", 3)
    with pytest.raises(ValueError, match=r"widget 'beta' registered twice"):
        reg.register("beta")(4)
    assert reg["alpha"] == 1 and reg["beta"] == 2  # the first registration stays
    with pytest.raises(ValueError, match="non-empty string"):
        reg.add("", 0)


def test_unknown_name_is_a_config_error_listing_known_names_sorted() -> None:
    reg = _reg()
    with pytest.raises(ConfigError, match=r"^unknown widget 'gamma'; known: alpha, beta$") as info:
        reg["gamma"]
    # Also a KeyError, so that Mapping.get / `in` and callers catching KeyError keep working, and printed
    # without KeyError's quotes (the CLI prints str(exc) as the one-line message).
    assert isinstance(info.value, KeyError) and isinstance(info.value, UnknownNameError)
    assert not str(info.value).startswith(("'", '"'))
    with pytest.raises(ConfigError, match=r"unknown widget \['x'\]"):
        reg[["x"]]  # type: ignore[index]
    hinted: Registry[int] = Registry("backbone", hint=", or 'timm:<name>'")
    hinted.add("a", 1)
    assert str(hinted.unknown("z")) == "unknown backbone 'z'; known: a, or 'timm:<name>'"


def test_unknown_name_error_survives_pickling() -> None:
    # DataLoader workers and DDP ranks send exceptions between processes.
    err = pickle.loads(pickle.dumps(_reg().unknown("q")))
    assert isinstance(err, UnknownNameError) and str(err) == "unknown widget 'q'; known: alpha, beta"


def test_registry_is_read_only() -> None:
    reg = _reg()
    with pytest.raises(TypeError):
        reg["gamma"] = 3  # type: ignore[index]
    with pytest.raises(TypeError):
        del reg["alpha"]  # type: ignore[attr-defined]


# --- the migrated registries keep their public behaviour -------------------------------------------


def test_migrated_registries_share_the_class_and_messages() -> None:
    from ctseg.cli import COMMANDS
    from ctseg.data import protocols, transforms
    from ctseg.data.prepare import get_preparer, list_preparers
    from ctseg.engine import losses, schedulers
    from ctseg.engine.guards import NONFINITE_POLICIES, NonFiniteGuard
    from ctseg.models import backbones, registry
    from ctseg.models.decoders import DECODERS, create_decoder

    for reg in (
        COMMANDS,
        protocols._REGISTRY,
        transforms._REGISTRY,
        losses._REGISTRY,
        schedulers._REGISTRY,
        NONFINITE_POLICIES,
        backbones._REGISTRY,
        registry._MODELS,
        registry._FAMILIES,
        DECODERS,
    ):
        assert isinstance(reg, Registry)
    assert list(COMMANDS)[:3] == ["demo", "prepare", "data"]  # `ctseg --help` order, not sorted
    assert {"dubai", "loveda"} <= set(list_preparers())
    with pytest.raises(ConfigError, match=r"^unknown dataset 'nope'; known: .*dubai"):
        get_preparer("nope")
    with pytest.raises(ConfigError, match=r"^unknown non-finite policy 'ignore'; known: skip, stop$"):
        NonFiniteGuard("ignore")
    with pytest.raises(ConfigError, match=r"^unknown decoder 'fpn'; known: dcfam, unetformer$"):
        create_decoder("fpn", [64, 128, 256, 512], 6)
    with pytest.raises(ConfigError, match=r"^unknown scheduler 'step'; known: constant, cosine, poly$"):
        schedulers.lr_factor("step", 0, 10)
    with pytest.raises(
        ConfigError, match=r"^unknown backbone 'nope'; known: .*, or 'timm:<timm model name>'$"
    ):
        backbones.create_backbone("nope")
    with pytest.raises(ValueError, match="timm"):
        backbones.register_backbone("timm:resnet18")
