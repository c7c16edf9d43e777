"""Loading a GGUF model with clear errors, and the facts about it the engine needs."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import llama_cpp.llama_cpp as C

from pymorph_edge.model import llama_log
from pymorph_edge.model.gguf_check import check_metadata
from pymorph_edge.model.model_options import ModelOptions

GGUF_MAGIC = b"GGUF"
_llama_model_default_params = C.llama_model_default_params  # bound once: tests substitute the module's name


@dataclass(frozen=True)
class ModelInfo:
    n_layer: int
    n_head: int
    n_head_kv: int
    n_swa: int  # sliding-window size; > 0 on iSWA models such as Gemma 3
    n_vocab: int
    n_ctx_train: int
    n_embd_k_gqa: int  # K elements per cell per layer
    n_embd_v_gqa: int  # V elements per cell per layer
    n_embd: int = 0  # width of the model's hidden state (an embedding's length)


def check_gguf_path(model_path: str | Path) -> Path:
    """Raise FileNotFoundError or ValueError (naming the path) unless it is a readable GGUF file."""
    path = Path(model_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {str(path)!r}")
    if not path.is_file():
        raise ValueError(f"model path is not a file: {str(path)!r}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r}): {str(path)!r}")
    check_metadata(path)  # what llama.cpp would abort on rather than refuse
    return path


def cpu_has_amx_kernels() -> bool:
    """True when this llama.cpp build repacks weights for Intel AMX (built natively on an AMX CPU).

    Its AMX matmul segfaults on Q4_K weights (llama.cpp issue #20824, seen here on Gemma 3 Q4_K_M), so
    such builds load models without extra buffer types; other CPUs keep llama.cpp's defaults."""
    info = C.llama_print_system_info() or b""
    return b"AMX_INT8 = 1" in info


def default_model_params() -> C.llama_model_params:
    """llama.cpp's default model parameters, less the AMX weight repacking where it crashes."""
    params = _llama_model_default_params()
    if cpu_has_amx_kernels():
        params.use_extra_bufts = False  # see cpu_has_amx_kernels
    return params


class LoadedModel:
    """Owns a llama_model; freed by close()."""

    def __init__(self, model_path: str | Path, options: ModelOptions | None = None) -> None:
        self.path = check_gguf_path(model_path)
        self.options = options or ModelOptions()
        if self.options.lora_path is not None and not Path(self.options.lora_path).expanduser().is_file():
            raise FileNotFoundError(f"lora_path not found: {str(self.options.lora_path)!r}")
        llama_log.install()
        C.llama_backend_init()
        params = default_model_params()
        self._keep_alive: list[object] = []  # arrays llama.cpp's params point to
        self.options.apply(params, self._keep_alive)
        self.ptr = C.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise ValueError(
                f"llama.cpp could not load {str(self.path)!r}: the GGUF is corrupt or its architecture is unsupported "
                "(enable logging at DEBUG for llama.cpp's reason)"
            )
        self.lora = None
        if self.options.lora_path is not None:
            lora = Path(self.options.lora_path).expanduser()
            if not lora.is_file():
                self.close()
                raise FileNotFoundError(f"lora_path not found: {str(lora)!r}")
            self.lora = C.llama_adapter_lora_init(self.ptr, str(lora).encode())
            if not self.lora:
                self.close()
                raise ValueError(f"llama.cpp could not load the LoRA adapter {str(lora)!r} for this model")
        self.vocab = C.llama_model_get_vocab(self.ptr)
        n_head, n_head_kv = C.llama_model_n_head(self.ptr), C.llama_model_n_head_kv(self.ptr)
        arch = self.meta("general.architecture") or ""
        head_dim = C.llama_model_n_embd(self.ptr) // max(n_head, 1)
        k_len = int(self.meta(f"{arch}.attention.key_length") or head_dim)
        v_len = int(self.meta(f"{arch}.attention.value_length") or head_dim)
        self.info = ModelInfo(
            n_layer=C.llama_model_n_layer(self.ptr),
            n_head=n_head,
            n_head_kv=n_head_kv,
            n_swa=C.llama_model_n_swa(self.ptr),
            n_vocab=C.llama_vocab_n_tokens(self.vocab),
            n_ctx_train=C.llama_model_n_ctx_train(self.ptr),
            n_embd_k_gqa=k_len * n_head_kv,
            n_embd_v_gqa=v_len * n_head_kv,
            n_embd=C.llama_model_n_embd(self.ptr),
        )

    @property
    def offloaded(self) -> bool:
        """Whether layers were put on a device off the host (a GPU, or an RPC server), where every read of a
        tensor waits for that device."""
        if self.options.n_gpu_layers == 0:
            return False
        if self.options.rpc_servers:
            return True
        from pymorph_edge.model.rpc_backend import has_gpu_device

        return has_gpu_device()

    def attach_lora(self, ctx: C.llama_context_p) -> None:
        """Apply the model's LoRA adapter (if any) to a context, at lora_scale."""
        if self.lora is None:
            return
        adapters = (C.llama_adapter_lora_p_ctypes * 1)(self.lora)
        scales = (ctypes.c_float * 1)(float(self.options.lora_scale))
        if C.llama_set_adapters_lora(ctx, adapters, 1, scales) != 0:
            raise RuntimeError("llama.cpp could not apply the LoRA adapter to the context")

    def metadata(self) -> dict[str, str]:
        """Every GGUF metadata key and value as text (llama_cpp.Llama.metadata)."""
        out: dict[str, str] = {}
        buf = ctypes.create_string_buffer(1 << 16)
        for i in range(C.llama_model_meta_count(self.ptr)):
            if C.llama_model_meta_key_by_index(self.ptr, i, buf, len(buf)) < 0:
                continue
            key = buf.value.decode("utf-8", errors="replace")
            n = C.llama_model_meta_val_str_by_index(self.ptr, i, buf, len(buf))
            if n >= len(buf):  # a long value (a chat template): read it again with room
                big = ctypes.create_string_buffer(n + 1)
                C.llama_model_meta_val_str_by_index(self.ptr, i, big, len(big))
                out[key] = big.value.decode("utf-8", errors="replace")
            elif n >= 0:
                out[key] = buf.value.decode("utf-8", errors="replace")
        return out

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def close(self) -> None:
        if getattr(self, "lora", None):
            C.llama_adapter_lora_free(self.lora)
            self.lora = None
        if self.ptr:
            C.llama_model_free(self.ptr)
            self.ptr = None
