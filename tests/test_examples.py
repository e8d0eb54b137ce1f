"""Every example runs in the test suite, so none of them rots."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_demo_walks_through_every_feature(
    redis_url: str, redis_client: object, capsys: pytest.CaptureFixture[str]
) -> None:
    await load("demo").main(redis_url)
    out = capsys.readouterr().out
    assert "handled" in out
    assert "consumer stopped: terminated, auto_stopped=True" in out
    assert "consumer stopped: deleted, auto_stopped=True" in out
    assert out.rstrip().endswith("Done.")
