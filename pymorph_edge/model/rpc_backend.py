"""llama.cpp's RPC backend (ggml-rpc): a model's layers served by other machines over TCP, or by a child process on
loopback. Both ends go through ggml's own C API (ggml-rpc.h, ggml-backend.h), called with ctypes from the
libraries llama-cpp-python installed; they exist only in a llama-cpp-python built with GGML_RPC (the README's
setup builds one).

RPC has no authentication and no encryption: anyone who reaches the port can run graphs on the server's device
and read what it holds. The server binds to loopback unless told otherwise.

Checked facts this follows (LLAMA_CPP_FACTS.md, "RPC"): a server is `ggml_backend_rpc_start_server(endpoint,
cache_dir, n_threads, n_devices, devices)` and blocks; a client registers a server's devices with
`ggml_backend_rpc_add_server` + `ggml_backend_register`, and the model uses them only when they are passed as
`llama_model_params.devices` (n_gpu_layers alone leaves every buffer on the CPU).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
import socket
from pathlib import Path

import llama_cpp.llama_cpp as C

logger = logging.getLogger(__name__)

_LIB_DIR = Path(C._lib._name).parent  # llama-cpp-python's lib/, next to libllama
_ENDPOINT = re.compile(r"^(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})$")
GGML_BACKEND_DEVICE_TYPE_CPU = 0
_registered: dict[str, list[int]] = {}  # endpoint -> its device handles, registered once per process


class RPCError(RuntimeError):
    """No RPC backend in this llama.cpp, or a server that does not answer."""


def rpc_supported() -> bool:
    """Whether this llama.cpp was built with the RPC backend."""
    return bool(C.llama_supports_rpc()) and (_LIB_DIR / "libggml-rpc.so").is_file()


def require_rpc() -> ctypes.CDLL:
    """libggml-rpc, or RPCError saying how to build it."""
    if not rpc_supported():
        raise RPCError(
            "this llama-cpp-python was built without llama.cpp's RPC backend (llama_supports_rpc() is False); "
            'rebuild it with CMAKE_ARGS="-DGGML_RPC=on" as the README\'s setup does'
        )
    return _rpc_lib()


@functools.cache  # loaded and typed once per process
def _rpc_lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_LIB_DIR / "libggml-rpc.so"))
    lib.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    lib.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_void_p),
    ]
    lib.ggml_backend_rpc_start_server.restype = None
    return lib


@functools.cache  # loaded and typed once per process
def _ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_LIB_DIR / "libggml.so"))
    lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_register.restype = None
    lib.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_name.restype = ctypes.c_char_p
    return lib


GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU = 1, 2


def has_gpu_device() -> bool:
    """Whether this llama.cpp registered a GPU (CUDA, Metal, Vulkan, an integrated one): where n_gpu_layers puts
    layers off the host. A CPU-only build keeps every layer on the CPU whatever n_gpu_layers says."""
    ggml = _ggml()
    return any(ggml.ggml_backend_dev_by_type(t) for t in (GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU))


def parse_endpoints(servers: str) -> list[str]:
    """ "host:port,host:port" -> the endpoints; ValueError naming the first malformed one."""
    if not isinstance(servers, str) or not servers.strip():
        raise ValueError(f"rpc_servers must be 'host:port[,host:port...]', got {servers!r}")
    out = []
    for item in (s.strip() for s in servers.split(",")):
        m = _ENDPOINT.match(item)
        if not m or not 0 < int(m["port"]) < 65536:
            raise ValueError(f"rpc server {item!r} is not host:port with a port in 1..65535 (in {servers!r})")
        out.append(item)
    return out


def rpc_devices(servers: str) -> list[int]:
    """The devices the given RPC servers offer, registered with ggml once per endpoint (llama.cpp keeps a
    registered backend for the life of the process). RPCError when a server does not answer."""
    endpoints = parse_endpoints(servers)
    rpc, ggml = require_rpc(), _ggml()
    devices: list[int] = []
    for ep in endpoints:
        if ep not in _registered:
            _check_reachable(ep)
            reg = rpc.ggml_backend_rpc_add_server(ep.encode())
            if not reg:
                raise RPCError(f"the RPC server at {ep} reports no device")
            ggml.ggml_backend_register(reg)
            found = [ggml.ggml_backend_reg_dev_get(reg, i) for i in range(ggml.ggml_backend_reg_dev_count(reg))]
            if not found or not all(found):
                raise RPCError(f"the RPC server at {ep} offers no device")
            _registered[ep] = found
            logger.info("RPC server %s: %s", ep, [ggml.ggml_backend_dev_name(d).decode() for d in found])
        devices += _registered[ep]
    return devices


def _check_reachable(endpoint: str, timeout_s: float = 10.0) -> None:
    """ggml-rpc aborts the process when it cannot connect (GGML_ABORT "Failed to connect"), so try first."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RPCError(
            f"could not reach the RPC server at {endpoint} ({exc.strerror or exc}); is `pymorph-edge rpc-server` running?"
        ) from None


def serve_rpc(host: str, port: int, n_threads: int) -> None:
    """Serve this machine's CPU to RPC clients on host:port; blocks until the process is stopped."""
    endpoint = f"{host}:{port}"
    parse_endpoints(endpoint)
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    rpc, ggml = require_rpc(), _ggml()
    C.llama_backend_init()
    cpu = ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU)
    if not cpu:
        raise RPCError("ggml has no CPU device to serve")
    devs = (ctypes.c_void_p * 1)(cpu)
    rpc.ggml_backend_rpc_start_server(endpoint.encode(), None, n_threads, 1, devs)
