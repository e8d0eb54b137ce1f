"""The public surface: ``redcurrent.__all__`` and the typing marker."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pydoc
import typing
from pathlib import Path

import msgspec
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


def test_router_and_context_are_public() -> None:
    """Handlers declared without a consumer, and what they reach at run time."""
    assert {"Router", "Context"} <= set(redcurrent.__all__)
    assert redcurrent.Router.__module__ == redcurrent.Context.__module__ == "redcurrent"


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
        redcurrent.TopicGoneError("orders", "NOGROUP"),
        redcurrent.ConfigurationError("bad option"),
        redcurrent.EncodeError("data of type object is not JSON-serialisable"),
        redcurrent.PayloadTooLargeError(9_000_000, 8_388_608, "1-0"),
        redcurrent.PayloadTooLargeError(10, 5, what="message of type 'email'"),
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


DOCUMENTED = [name for name in redcurrent.__all__ if name != "__version__"]
STRUCTS = [
    name
    for name in redcurrent.__all__
    if isinstance(getattr(redcurrent, name), type)
    and issubclass(getattr(redcurrent, name), msgspec.Struct)
]


@pytest.mark.parametrize("name", DOCUMENTED)
def test_help_renders_every_public_name(name: str) -> None:
    # help(X) is pydoc.render_doc(X) printed; it evaluates the annotations of
    # msgspec Structs (their __signature__) in the module named by __module__.
    text = pydoc.render_doc(getattr(redcurrent, name), renderer=pydoc.plaintext)
    assert name in text
    assert "redcurrent" in text


def test_help_shows_the_fields_of_message_and_dead_letter() -> None:
    message = pydoc.render_doc(redcurrent.Message, renderer=pydoc.plaintext)
    assert "data: ~T" in message
    assert "delivery_count: int = 1" in message
    letter = pydoc.render_doc(redcurrent.DeadLetter, renderer=pydoc.plaintext)
    assert "data: Any" in letter
    assert "fields: dict[bytes, bytes]" in letter


def test_structs_are_listed() -> None:
    assert {"Message", "DeadLetter", "TopicInfo", "GroupInfo", "CleanupPolicy"} <= set(STRUCTS)


@pytest.mark.parametrize("name", STRUCTS)
def test_struct_annotations_resolve(name: str) -> None:
    cls = getattr(redcurrent, name)
    hints = typing.get_type_hints(cls)
    assert set(hints) == set(cls.__struct_fields__)
    assert list(inspect.signature(cls).parameters) == list(cls.__struct_fields__)


def test_messages_and_dead_letters_decode_with_msgspec() -> None:
    # msgspec resolves the annotations too, to build a decoder for the type.
    msg = redcurrent.Message[int](id="1-0", type="t", data=7, metadata={}, stream="s")
    assert msgspec.json.decode(msgspec.json.encode(msg), type=redcurrent.Message[int]) == msg
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(msg), type=redcurrent.Message[str])
    letter = redcurrent.DeadLetter(
        id="2-0",
        original_id="1-0",
        type="t",
        data={"a": 1},
        metadata={},
        group="g",
        consumer="c",
        reason="r",
        error_type="E",
        delivery_count=1,
        failed_at=1.5,
        fields={b"type": b"t", b"data": b'{"a":1}'},
    )
    copy = msgspec.msgpack.decode(msgspec.msgpack.encode(letter), type=redcurrent.DeadLetter)
    assert copy == letter


def test_only_these_modules_are_public() -> None:
    """Everything else is an implementation module: users import from ``redcurrent``
    (and ``redcurrent.errors`` / ``redcurrent.testing`` / ``redcurrent.prometheus``),
    so internals can move."""
    import pkgutil

    public = {
        info.name
        for info in pkgutil.iter_modules(redcurrent.__path__)
        if not info.name.startswith("_")
    }
    assert public == {"errors", "otel", "prometheus", "testing"}
