"""The native library refuses to run against a llama.cpp it was not built for."""

import importlib.metadata

import pytest

from pymorph_edge import _native


def test_selfcheck_passes_on_the_installed_llama_cpp():
    ffi, lib = _native.native()
    err = ffi.new("char[256]")
    assert lib.pme_selfcheck(err, 256) == 0, ffi.string(err)
    assert ffi.string(lib.pme_built_for_version()).decode() == importlib.metadata.version("llama-cpp-python")


def test_version_mismatch_is_refused_with_a_clear_error(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "9.9.9" if name == "llama-cpp-python" else real(name)
    )
    _native.native.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"built for llama-cpp-python 0\.3\.36 but 9\.9\.9 is installed"):
            _native.native()
    finally:
        monkeypatch.undo()
        _native.native.cache_clear()
    _native.native()  # loads again once the versions agree
