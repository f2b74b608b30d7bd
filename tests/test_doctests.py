"""Every docstring example in the package runs (doctest), so the examples stay true."""

import doctest
import importlib
import pkgutil

import pytest

import snapjax

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(snapjax.__path__, "snapjax.") if not m.name.split(".")[-1].startswith("__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
