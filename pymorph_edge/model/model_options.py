"""How the model file is loaded: llama_model_params an app may set, under llama_cpp.Llama's keyword names."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as C


@dataclass
class ModelOptions:
    """llama_model_params an app may set (llama_cpp's names)."""

    n_gpu_layers: int = 0
    main_gpu: int = 0
    split_mode: int = C.LLAMA_SPLIT_MODE_LAYER
    tensor_split: Sequence[float] | None = None
    use_mmap: bool = True
    use_mlock: bool = False
    lora_path: str | None = None  # a LoRA adapter GGUF applied to every context of the model
    lora_scale: float = 1.0
    rpc_servers: str | None = None  # "host:port,...": offload to llama.cpp RPC servers (model/rpc_backend.py)
    # llama.cpp's CPU weight repacking (extra buffer types): off, the CPU backend multiplies as an rpc-server does
    use_extra_bufts: bool = True

    def __post_init__(self) -> None:
        for name in ("n_gpu_layers", "main_gpu", "split_mode"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an int, got {v!r}")
        if self.n_gpu_layers < -1:
            raise ValueError(f"n_gpu_layers must be -1 (all) or >= 0, got {self.n_gpu_layers}")
        if self.split_mode not in (C.LLAMA_SPLIT_MODE_NONE, C.LLAMA_SPLIT_MODE_LAYER, C.LLAMA_SPLIT_MODE_ROW):
            raise ValueError(f"split_mode must be 0 (none), 1 (layer) or 2 (row), got {self.split_mode!r}")
        if self.tensor_split is not None:
            ts = list(self.tensor_split)
            if len(ts) > C.LLAMA_MAX_DEVICES or not all(isinstance(x, (int, float)) and x >= 0 for x in ts):
                raise ValueError(
                    f"tensor_split must be at most {C.LLAMA_MAX_DEVICES} non-negative numbers, got {self.tensor_split!r}"
                )
        if (
            self.lora_path is not None
            and not isinstance(self.lora_path, (str, bytes))
            and not hasattr(self.lora_path, "__fspath__")
        ):
            raise ValueError(f"lora_path must be a path, got {self.lora_path!r}")
        if isinstance(self.lora_scale, bool) or not isinstance(self.lora_scale, (int, float)):
            raise ValueError(f"lora_scale must be a number, got {self.lora_scale!r}")
        if self.lora_path is not None:
            self.use_mmap = False  # as llama_cpp.Llama: an adapter is applied to weights read into memory
        if self.rpc_servers is not None:
            from pymorph_edge.model.rpc_backend import parse_endpoints

            parse_endpoints(self.rpc_servers)
            if self.n_gpu_layers == 0:
                raise ValueError(
                    f"rpc_servers={self.rpc_servers!r} with n_gpu_layers=0 would offload nothing; "
                    "pass n_gpu_layers (-1: all layers)"
                )
        for name in ("use_mmap", "use_mlock", "use_extra_bufts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def apply(self, params: C.llama_model_params, keep_alive: list[Any]) -> None:
        """Set these on llama.cpp's model params; arrays it points to are appended to keep_alive."""
        params.n_gpu_layers = 0x7FFFFFFF if self.n_gpu_layers == -1 else self.n_gpu_layers
        params.main_gpu = self.main_gpu
        params.split_mode = self.split_mode
        if self.tensor_split is not None:
            arr = (ctypes.c_float * C.LLAMA_MAX_DEVICES)(*[float(x) for x in self.tensor_split])
            keep_alive.append(arr)
            params.tensor_split = arr
        if self.rpc_servers is not None:
            from pymorph_edge.model.rpc_backend import rpc_devices

            # only the devices listed here are used: n_gpu_layers alone leaves every buffer on the CPU
            devs = rpc_devices(self.rpc_servers)
            arr = (ctypes.c_void_p * (len(devs) + 1))(*devs, None)
            keep_alive.append(arr)
            params.devices = ctypes.cast(arr, ctypes.c_void_p)
        params.use_extra_bufts = self.use_extra_bufts
        # llama.cpp folds the two flags into one load mode (llama_cpp.Llama does the same)
        params.load_mode = {
            (True, True): C.LLAMA_LOAD_MODE_MMAP_MLOCK,
            (False, True): C.LLAMA_LOAD_MODE_MLOCK,
            (True, False): C.LLAMA_LOAD_MODE_MMAP,
            (False, False): C.LLAMA_LOAD_MODE_NONE,
        }[(self.use_mmap, self.use_mlock)]
