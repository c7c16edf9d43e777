"""KV cache element types: the names users give, llama.cpp's enum for each, their exact size, and which
ones need flash attention.

The names are llama.cpp's own `--cache-type-k/-v` values ("f16", "q8_0", ...), under llama-cpp-python's
argument names `type_k` / `type_v`: the names people already pass to `llama_cpp.Llama`, with the values
people already type into llama.cpp's CLI, rather than ggml enum integers."""

from __future__ import annotations

# name -> (elements per block, bytes per block): the types llama.cpp's CLI offers for a KV cache, all of
# which the flash-attention scorer (native/pme_fattn.c) reads; the enum is llama_cpp's GGML_TYPE_<NAME>
KV_TYPES: dict[str, tuple[int, int]] = {
    "f16": (1, 2),
    "f32": (1, 4),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q5_1": (32, 24),
    "q5_0": (32, 22),
    "q4_1": (32, 20),
    "q4_0": (32, 18),
    "iq4_nl": (32, 18),
}
FLOAT_TYPES = ("f32", "f16", "bf16")


def check_kv_type(setting: str, name: object) -> str:
    """The type's name, or a ValueError naming the setting and the types on offer."""
    if not isinstance(name, str) or name.lower() not in KV_TYPES:
        raise ValueError(f"{setting} must be one of {', '.join(KV_TYPES)}; got {name!r}")
    return name.lower()


def ggml_type(name: str) -> int:
    import llama_cpp.llama_cpp as C  # here, so that `pymorph-edge --help` need not load llama.cpp

    return int(getattr(C, "GGML_TYPE_" + name.upper()))


def row_bytes(name: str, n_elems: int) -> int:
    """Exact bytes of n_elems elements of this type (llama.cpp requires whole blocks per row)."""
    block, size = KV_TYPES[name]
    if n_elems % block:
        raise ValueError(f"a {name} cache needs rows of whole {block}-element blocks; this model's has {n_elems}")
    return n_elems // block * size


def check_head_size(setting: str, name: str, head_size: int) -> None:
    """llama.cpp quantizes each head's row in whole blocks: refuse a type whose block does not divide it."""
    block = KV_TYPES[name][0]
    if head_size % block:
        raise ValueError(
            f"{setting}={name!r} stores {block}-element blocks, which do not divide this model's head size "
            f"{head_size}; use f16 or bf16"
        )


def check_flash_attn(type_k: str, type_v: str, flash_attn: bool | None) -> None:
    """llama.cpp refuses a quantized V cache without flash attention: say so before it does, naming both."""
    if type_v not in FLOAT_TYPES and flash_attn is False:
        raise ValueError(
            f"type_v={type_v!r} needs flash attention (llama.cpp stores V transposed without it, which a "
            "quantized type cannot be); set flash_attn=True or leave it unset, or use type_v='f16'"
        )
