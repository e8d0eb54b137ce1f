"""The public surface: ``redcurrent.__all__`` and the typing marker."""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path

import pytest

import redcurrent


def test_all_is_sorted_and_unique() -> None:
    names = list(redcurrent.__all__)
    assert len(names) == len(set(names))
    assert names == sorted(names)


@pytest.mark.parametrize("name", redcurrent.__all__)
def test_every_public_name_is_importable(name: str) -> None:
    module = importlib.import_module("redcurrent")
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from redcurrent import {name}", namespace)
    assert namespace[name] is getattr(module, name)


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from redcurrent import *", namespace)
    namespace.pop("__builtins__", None)
    assert set(namespace) == set(redcurrent.__all__)


def test_design_contract_names_are_public() -> None:
    for name in ("Topic", "Message", "StartFrom", "StopReason", "RedcurrentError"):
        assert name in redcurrent.__all__


def test_errors_share_one_root() -> None:
    for name in redcurrent.__all__:
        obj = getattr(redcurrent, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, redcurrent.RedcurrentError), name


def test_version_is_a_string() -> None:
    assert isinstance(redcurrent.__version__, str)
    assert redcurrent.__version__


def test_py_typed_ships() -> None:
    package_dir = Path(redcurrent.__file__).parent
    marker = package_dir / "py.typed"
    assert marker.is_file()


@pytest.mark.parametrize(
    "error",
    [
        redcurrent.DecodeError("1-0", "bad"),
        redcurrent.ValidationError("1-0", "bad"),
        redcurrent.NoHandlerError("1-0", "email"),
        redcurrent.BatchError(["1-0"], "one failed"),
        redcurrent.TopicGoneError("orders", "NOGROUP", terminated=True),
        redcurrent.ConfigurationError("bad option"),
    ],
)
def test_errors_survive_pickling(error: redcurrent.RedcurrentError) -> None:
    # They cross process boundaries (worker pools, multiprocessing logs).
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_public_names_show_the_package_module() -> None:
    assert redcurrent.StreamConsumer.__module__ == "redcurrent"
    assert repr(redcurrent.StopReason.STOPPED) == "<StopReason.STOPPED: 'stopped'>"
