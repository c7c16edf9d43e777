"""Routes llama.cpp's log lines into Python logging and records the KV buffer sizes it reports.

llama.cpp has one process-wide log callback, so this module installs it once. The KV cache
allocation is only reported through these lines, which is why they are parsed here.
"""

from __future__ import annotations

import ctypes
import logging
import re
import sys
import threading

import llama_cpp.llama_cpp as C

logger = logging.getLogger("pymorph_edge.llama_cpp")

# e.g. "llama_kv_cache: size =    4.50 MiB (  1536 cells,   3 layers,  1/1 seqs), K (f16): 2.25 MiB, V (f16): 2.25 MiB"
_KV_SIZE = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB \( *(\d+) cells, +(\d+) layers.*K \((\w+)\).*V \((\w+)\)")
_lock = threading.Lock()
_capture: list[tuple[float, int, int, str, str]] | None = None
_pending = ""


@C.llama_log_callback
def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    global _pending
    msg = text.decode("utf-8", errors="replace")
    # llama.cpp sends partial lines (continuations); assemble them before logging
    _pending += msg
    if not _pending.endswith("\n"):
        return
    line, _pending = _pending.rstrip("\n"), ""
    if _capture is not None:
        m = _KV_SIZE.search(line)
        if m:
            mib, cells, layers, k_type, v_type = m.groups()
            _capture.append((float(mib), int(cells), int(layers), k_type, v_type))
    if _verbose is False:
        return  # Llama(verbose=False): silent, as llama_cpp
    if _verbose:
        sys.stderr.write(line + "\n")  # Llama(verbose=True): llama.cpp's own log on stderr, as llama_cpp
        return
    # llama.cpp level 4 is ERROR; everything else is diagnostic chatter
    logger.log(logging.WARNING if level == 4 else logging.DEBUG, "%s", line)


_verbose: bool | None = None


def set_verbose(verbose: bool | None) -> None:
    """True: llama.cpp's log goes to stderr; False: nowhere; None: Python logging (errors as warnings, the rest at
    DEBUG). Process-wide, as llama.cpp has one log callback: the last Llama constructed decides."""
    global _verbose
    _verbose = verbose


_installed = False


def install() -> None:
    global _installed
    if not _installed:
        C.llama_log_set(_on_log, ctypes.c_void_p(0))
        _installed = True


class KVSizeCapture:
    """Context manager collecting each KV cache llama.cpp allocates inside it: (MiB, cells, layers, K type, V type)."""

    def __enter__(self) -> KVSizeCapture:
        global _capture
        _lock.acquire()
        self.sizes: list[tuple[float, int, int, str, str]] = []
        _capture = self.sizes
        return self

    def __exit__(self, *exc: object) -> None:
        global _capture
        _capture = None
        _lock.release()

    def total_bytes(self, k_bytes_per_cell_layer: int, v_bytes_per_cell_layer: int) -> int:
        """Exact bytes from cells x layers, given the K and V bytes per cell and layer
        (kv_cache_types.row_bytes of n_embd_k_gqa / n_embd_v_gqa): the log's MiB is rounded to 0.01 MiB."""
        return sum(
            cells * layers * (k_bytes_per_cell_layer + v_bytes_per_cell_layer) for _, cells, layers, _, _ in self.sizes
        )
