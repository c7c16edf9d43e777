"""Loads the native MorphKV library (cffi, ABI mode) and checks it matches the running llama.cpp."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any

import cffi
import llama_cpp  # noqa: F401  loads libllama/libggml with RTLD_GLOBAL before our library needs them

logger = logging.getLogger(__name__)

_LIB_NAME = {"darwin": "libpme.dylib", "win32": "pme.dll"}.get(sys.platform, "libpme.so")


def _candidate_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    dirs = [here, Path(sysconfig.get_paths()["platlib"]) / "pymorph_edge"]
    if os.environ.get("PME_LIBRARY_DIR"):
        dirs.insert(0, Path(os.environ["PME_LIBRARY_DIR"]))
    return dirs


def _read_cdef(header: Path) -> str:
    text = header.read_text()
    start, end = text.index("/* CFFI-BEGIN */"), text.index("/* CFFI-END */")
    # cffi's parser takes declarations only; comments are fine, preprocessor lines are not present here
    return text[start + len("/* CFFI-BEGIN */") : end]


def _find(name: str) -> Path:
    for d in _candidate_dirs():
        if (d / name).is_file():
            return d / name
    src = Path(__file__).resolve().parent.parent / "native" / name
    if name.endswith(".h") and src.is_file():
        return src
    raise ImportError(
        f"pymorph_edge native file {name!r} not found in {[str(d) for d in _candidate_dirs()]}; "
        "reinstall with `pip install .` so the C library is built"
    )


@lru_cache(maxsize=1)
def native() -> tuple[Any, Any]:
    """Return (ffi, lib). Raises ImportError when the library is missing or was built for another llama.cpp."""
    ffi = cffi.FFI()
    ffi.cdef(_read_cdef(_find("pme.h")))
    path = _find(_LIB_NAME)
    lib = ffi.dlopen(str(path))
    built_for = ffi.string(lib.pme_built_for_version()).decode()
    running = importlib.metadata.version("llama-cpp-python")
    if built_for != running:
        raise ImportError(
            f"pymorph_edge's native library was built for llama-cpp-python {built_for} but {running} is installed; "
            "reinstall pymorph_edge so it is rebuilt against the installed llama.cpp"
        )
    err = ffi.new("char[256]")
    if lib.pme_selfcheck(err, 256) != 0:
        raise ImportError(f"{ffi.string(err).decode()} ({ffi.string(lib.pme_build_info()).decode()})")
    logger.debug("loaded %s: %s", path, ffi.string(lib.pme_build_info()).decode())
    return ffi, lib
