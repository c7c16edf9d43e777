"""Settings of the decode engine, and the rules that check them against a model: the budget a policy
needs, and the position span at which the cache is renumbered (and whether it can be)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as C

from pymorph_edge.engine.evicted_log import DEFAULT_LOG_BYTES
from pymorph_edge.engine.key_log import DEFAULT_KEY_BYTES
from pymorph_edge.engine.kv_cache_types import FLOAT_TYPES, check_flash_attn, check_kv_type
from pymorph_edge.model.model_file import LoadedModel
from pymorph_edge.policies import KVPolicy

# evicted K/V kept on the host by default where a restore is cheap: 11.6K tokens of SmolLM2 (23 KB a token), so a
# chat's first turn still restores at a 4K-token history; older rows are dropped first and recall recomputes them.
# malloc'd once, so the pages a shorter conversation never writes cost no memory
DEFAULT_KV_BYTES = 256 << 20


@dataclass
class EngineConfig:
    """Rarely changed settings of the llama.cpp context."""

    n_ubatch: int = 512  # prefill chunk; the cache peaks at kv_budget + n_ubatch cells
    n_ctx: int | None = None  # full cache only: context size (default 4096); bounded runs derive it
    n_threads: int | None = None  # default: all cores
    n_threads_batch: int | None = None  # threads for prompt chunks (default: n_threads)
    rope_freq_base: float = 0.0  # 0: the model's own (llama.cpp's convention)
    rope_freq_scale: float = 0.0  # 0: the model's own
    penalty_last_n: int = 64  # tokens the repeat penalties look back over (llama_cpp's last_n_tokens_size)
    flash_attn: bool | None = None  # None: on where it pays (resolve_flash_attn); a quantized type_v needs it
    type_k: str = "f16"  # K cache element type, llama.cpp's names: f16, bf16, q8_0, q4_0, ... (kv_cache_types)
    type_v: str = "f16"  # V cache element type; a quantized one needs flash attention
    swa_full: bool | None = None  # full cache only: None keeps llama_cpp.Llama's choice (True)
    n_keep: int = 0  # first tokens never evicted (llama.cpp's n_keep); Llama(keep="system") sets it per chat
    recall: bool | None = None  # bring evicted text back for new requests (engine/recall.py); None: the policy's
    recall_tokens: int | None = None  # most tokens one request recalls (None: recall.default_recall_tokens)
    recall_log_bytes: int = DEFAULT_LOG_BYTES  # token ids kept for recall, oldest dropped beyond this
    # how recall judges relevance (docs/recall.md): "bm25" (the words), "attention" (the model's attention over
    # logged keys), "both" (BM25's picks; attention's when no evicted sentence shares a word with what is asked).
    # The words alone by default since stop 47: "both" asked attention at every turn whose words found nothing (each
    # pasted-notes turn of a long chat), and the prose it brought back cost answers past n_ctx_train (SmolLM2 4 of 8
    # against 8 of 8 with the words alone, Gemma 3 1 of 4 against 4 of 4); at ~1K tokens the words alone answered as
    # often on SmolLM2 and more on Gemma 3 (docs/recall.md, "The words alone")
    recall_by: str = "bm25"
    recall_key_bytes: int = DEFAULT_KEY_BYTES  # keys kept for "attention" and "both", oldest dropped beyond this
    # evicted tokens' K/V rows kept on the host, so recall restores text instead of recomputing it (0: off; on iSWA
    # models every token's sliding-window rows too; the context then has a second sequence and a unified cache;
    # docs/recall.md). None: DEFAULT_KV_BYTES where restoring is cheap (resolve_kv_store_bytes), 0 elsewhere
    recall_kv_bytes: int | None = None
    # which recalled blocks are restored from saved K/V: "chat" (a chat turn's, inside the new user message; the
    # default since stop 50: SmolLM2's seven chat sets answered 43 of 56 against 44 recomputing, and a 32-token
    # question turn took 1.13x / 1.08x the turn without recall against 1.21x / 1.19x), "all" (a completion's raw
    # block too: restored rows copied fewer continuation digits than recomputed ones, 184 against 204 of 280)
    recall_restore: str = "chat"
    # recall also inside a generation, when a word just completed names text evicted from the cache
    # (generation/generation_recall.py); None: RECALL_IN_GENERATION
    recall_in_generation: bool | None = None
    # how many layers' attention a native policy reads (engine/layer_choice.py): None: the policy's default
    # (KVPolicy.read_layers: every layer; with layers off the host or flash attention on, a quarter of them a decode
    # step in turn and as many chosen ones for long prompt chunks: resolve_score_layers), "all", or a count; each
    # one read costs a graph split and a fold, so a count is a speed setting for flash attention and GPU / RPC
    # backends, at a measured cost in recall
    score_layers: int | str | None = None
    # with score_layers k: prompt chunks read every layer, and each decode step the next 1/ceil(n/k) of them in turn;
    # "chunks": also a prompt chunk longer than two windows reads only the k chosen layers (probes still read all)
    rotate_layers: bool | str = False
    max_span: int | None = (
        None  # bounded policies: renumber positions when a token's would reach this (None: default_max_span)
    )

    def __post_init__(self) -> None:
        if isinstance(self.n_ubatch, bool) or not isinstance(self.n_ubatch, int) or self.n_ubatch < 1:
            raise ValueError(f"n_ubatch must be a positive int, got {self.n_ubatch!r}")
        if self.n_ctx is not None and (not isinstance(self.n_ctx, int) or self.n_ctx < 1):
            raise ValueError(f"n_ctx must be a positive int or None, got {self.n_ctx!r}")
        if self.n_threads is not None and (not isinstance(self.n_threads, int) or self.n_threads < 1):
            raise ValueError(f"n_threads must be a positive int or None, got {self.n_threads!r}")
        if self.n_threads_batch is not None and (
            isinstance(self.n_threads_batch, bool)
            or not isinstance(self.n_threads_batch, int)
            or self.n_threads_batch < 1
        ):
            raise ValueError(f"n_threads_batch must be a positive int or None, got {self.n_threads_batch!r}")
        for name in ("rope_freq_base", "rope_freq_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name} must be a number >= 0 (0: the model's own), got {v!r}")
        if isinstance(self.penalty_last_n, bool) or not isinstance(self.penalty_last_n, int) or self.penalty_last_n < 0:
            raise ValueError(f"last_n_tokens_size must be an int >= 0, got {self.penalty_last_n!r}")
        if self.flash_attn is not None and not isinstance(self.flash_attn, bool):
            raise ValueError(f"flash_attn must be True, False or None, got {self.flash_attn!r}")
        self.type_k = check_kv_type("type_k", self.type_k)
        self.type_v = check_kv_type("type_v", self.type_v)
        check_flash_attn(self.type_k, self.type_v, self.flash_attn)
        if self.recall_by not in ("bm25", "attention", "both"):
            raise ValueError(f"recall_by must be 'bm25', 'attention' or 'both', got {self.recall_by!r}")
        _check_non_negative("recall_key_bytes", self.recall_key_bytes)
        if self.recall_kv_bytes is not None:
            _check_non_negative("recall_kv_bytes", self.recall_kv_bytes)
        if self.recall_restore not in ("chat", "all"):
            raise ValueError(f"recall_restore must be 'chat' or 'all', got {self.recall_restore!r}")
        if self.recall is not None and not isinstance(self.recall, bool):
            raise ValueError(f"recall must be True, False or None, got {self.recall!r}")
        if self.recall_in_generation is not None and not isinstance(self.recall_in_generation, bool):
            raise ValueError(f"recall_in_generation must be True, False or None, got {self.recall_in_generation!r}")
        if self.recall_tokens is not None and (
            isinstance(self.recall_tokens, bool) or not isinstance(self.recall_tokens, int) or self.recall_tokens < 0
        ):
            raise ValueError(f"recall_tokens must be a non-negative int or None, got {self.recall_tokens!r}")
        _check_non_negative("recall_log_bytes", self.recall_log_bytes)
        if isinstance(self.n_keep, bool) or not isinstance(self.n_keep, int) or self.n_keep < 0:
            raise ValueError(f"keep must be a non-negative int, got {self.n_keep!r}")
        if self.score_layers not in (None, "all") and (
            isinstance(self.score_layers, bool) or not isinstance(self.score_layers, int) or self.score_layers < 1
        ):
            raise ValueError(
                f"score_layers must be a positive int, 'all' or None (the policy's default), got {self.score_layers!r}"
            )
        if not isinstance(self.rotate_layers, bool) and self.rotate_layers != "chunks":
            raise ValueError(f"rotate_layers must be True, False or 'chunks', got {self.rotate_layers!r}")
        if self.max_span is not None and (
            isinstance(self.max_span, bool) or not isinstance(self.max_span, int) or self.max_span < 1
        ):
            raise ValueError(f"max_span must be a positive int or None, got {self.max_span!r}")


# With a budget and flash_attn unset: measured on this project's 2-core CPU machine (benchmarks/results/fattn-*)
FLASH_ATTN_WHEN_BOUNDED = False


def resolve_flash_attn(config: EngineConfig, bounded_scoring: bool) -> bool:
    """Whether the context runs flash attention: as set, else on for a quantized V cache (llama.cpp needs it),
    else FLASH_ATTN_WHEN_BOUNDED for a scored budget, else off like llama_cpp.Llama."""
    if config.flash_attn is not None:
        return config.flash_attn
    if config.type_v not in FLOAT_TYPES:
        return True
    return FLASH_ATTN_WHEN_BOUNDED if bounded_scoring else False


# Off the host (layers on a GPU or an RPC server) each layer read is a synchronisation: llama.cpp's scheduler waits
# for the device before every node an eval callback reads, 33-51 us each on an H200, where a SmolLM2 decode step
# takes 1.2-2.1 ms. Reading every layer there ran decode at 0.43-0.62x the full cache (docs/offload.md). With flash
# attention on, a read on the host is not free either: the row was never written out, so the scorer recomputes q.K
# and exp over every cell of the layer, and decode ran at 0.85-0.88x the unbounded cache. So where reads cost, a
# policy that would read every layer reads a quarter of them a decode step, in turn (every layer's attention still
# enters MorphKV's window, every 4th step), at least 8, the count measured on SmolLM2's 30 layers; and a long prompt
# chunk reads as many, always the chosen ones ("chunks": evenly spaced, with the copying heads' layers), while the
# probes that decide what a prompt keeps read every layer. SmolLM2, flash attention on: decode 0.94x the unbounded
# cache (f16), prompt 0.97x a raw llama.cpp loop (q8_0), passkey 90% against every layer's 95% (one 8x key of 21);
# the continuation recall copied 243 digits of 280 against every layer's 235, the chats answered 46 of 56 against
# 44 (docs/scoring.md, "Flash attention on the host" and "Long prompt chunks read the chosen layers"). Chunks read
# in turn too lost the passkeys (48%).
# On the host with flash attention off a read folds a row llama.cpp just wrote, and every layer stays the default.
OFF_HOST_TURNS = 4
OFF_HOST_MIN_LAYERS = 8


def resolve_score_layers(
    config: EngineConfig, policy: KVPolicy, n_layer: int = 0, off_host: bool = False, flash_attn: bool = False
) -> tuple[int | None, bool | str]:
    """Layers a native policy reads and whether it takes them in turn (rotate_layers): config.score_layers, else
    the policy's default, which off the host or with flash attention on is a quarter of the layers a decode step
    in turn (OFF_HOST_TURNS), and as many chosen ones for long prompt chunks ("chunks"); None means all."""
    if config.score_layers is not None:
        return (None if config.score_layers == "all" else int(config.score_layers)), config.rotate_layers
    reads_cost = off_host or flash_attn
    if reads_cost and policy.read_layers is None and n_layer > OFF_HOST_MIN_LAYERS:
        return max(OFF_HOST_MIN_LAYERS, -(-n_layer // OFF_HOST_TURNS)), "chunks"
    return policy.read_layers, config.rotate_layers


def can_compact(mem: C.llama_memory_t, model: LoadedModel) -> bool:
    """Whether llama.cpp can renumber this cache's positions (re-rotating K).

    llama_memory_can_shift also says no for every iSWA cache whose sliding-window part is smaller than
    its base part, although each part shifts its own K; compaction keeps the recent n_swa tokens
    contiguous, so it is safe there (tests/test_compaction.py). What neither part can shift is RoPE with
    several positions per token (M-RoPE) and Step-3.5's per-layer RoPE."""
    if C.llama_memory_can_shift(mem):
        return True
    rope = C.llama_model_rope_type(model.ptr)
    multi_pos = rope not in (C.LLAMA_ROPE_TYPE_NONE, C.LLAMA_ROPE_TYPE_NORM, C.LLAMA_ROPE_TYPE_NEOX)
    return model.info.n_swa > 0 and not multi_pos and model.meta("general.architecture") != "step35"


def default_max_span(n_ctx_train: int, n_cells: int) -> int:
    """Position span at which a bounded cache is renumbered: the trained context.

    Chosen by measurement (benchmarks/results/smollm2-longrun/, SmolLM2, n_ctx_train 8192, budget 1024,
    24.6K teacher-forced tokens): the worst segment's ppl against context_shift's was 1.073x renumbering
    at span 3072, 1.068x at 4096 and 1.030x at 8192; never renumbering broke down past ~12K (185x).
    Renumbering less often keeps the kept tokens' distances true for longer, and the model was trained on
    every span up to n_ctx_train. Never below two caches' worth of cells, so that each renumbering buys
    at least n_cells tokens."""
    return max(n_ctx_train, 2 * n_cells)


def _check_non_negative(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def validate_budget(kv_budget: int | None, policy: KVPolicy, n_swa: int) -> None:
    """Raise ValueError, naming the values, when the budget cannot hold what the policy must keep."""
    if kv_budget is None:
        return
    if isinstance(kv_budget, bool) or not isinstance(kv_budget, int) or kv_budget < 1:
        raise ValueError(f"kv_budget must be a positive int or None, got {kv_budget!r}")
    recent = policy.protected_recent
    if kv_budget <= recent:
        raise ValueError(f"kv_budget={kv_budget} must be larger than the policy's recent window ({recent})")
    if n_swa > 0 and kv_budget < n_swa + recent:
        raise ValueError(
            f"kv_budget={kv_budget} is too small for this sliding-window model: tokens inside its {n_swa}-token "
            f"window cannot be evicted, so kv_budget must be at least n_swa + window = {n_swa + recent}"
        )


def merge_config(config: EngineConfig | None, **given: Any) -> EngineConfig:
    """The shortcut arguments (n_ctx, n_threads, flash_attn, type_k, type_v) merged into config; a clash is a
    ValueError."""
    given = {k: v for k, v in given.items() if v is not None}
    if config is None:
        return EngineConfig(**given)
    default = EngineConfig()
    clash = {k: v for k, v in given.items() if getattr(config, k) not in (getattr(default, k), v)}
    if clash:
        raise ValueError(f"{clash} contradicts config={config}; set it in one place")
    return dataclasses.replace(config, **given)


def _padded(n: int) -> int:
    return (n + 255) // 256 * 256  # llama.cpp pads n_ctx to 256 cells


def _apart_from_swa_cache(n_ctx: int, n_swa: int, n_ubatch: int) -> int:
    """Cells for the base cache of an iSWA model, never as many as its sliding-window cache.

    llama.cpp sizes the sliding-window cache pad(min(base cells, n_swa + n_ubatch)) (llama_kv_cache_iswa; n_swa
    times n_seq_max in a unified cache, so the caller passes that as n_swa), and
    the native scorer tells the two caches apart by their cell count. At kv_budget 640 and n_ubatch 128 on
    Gemma 3 both came to 768 cells, and the scorer mapped the sliding-window cache's cells (found by
    tests/test_sessions.py: llama.cpp kept 13 positions the scorer thought evicted). Padding steps of 256 cells
    (of the few global layers) until they differ keep them apart."""
    base = _padded(n_ctx)
    if _padded(min(base, n_swa + n_ubatch)) != base:
        return n_ctx
    while _padded(min(base, n_swa + n_ubatch)) == base:  # more than one step when n_swa + n_ubatch passes base
        base += 256
    return base


def resolve_kv_store_bytes(config: EngineConfig, recalls: bool, n_swa: int, on_host: bool) -> int:
    """The bytes of evicted K/V kept for recall to restore: what the user set, else DEFAULT_KV_BYTES where a restore
    is cheap, and 0 where it is not: no recall; a sliding-window (iSWA) model, whose every token's window rows must
    be copied and whose window cache the second sequence doubles (Gemma 3 recomputes a block as fast: docs/recall.md,
    "On Gemma 3 it buys nothing"); a quantized K, which llama.cpp re-rotates over the whole cache instead of the
    scorer turning the restored rows; layers off the host, whose rows the scorer does not copy."""
    if config.recall_kv_bytes is not None:
        return config.recall_kv_bytes
    cheap = recalls and n_swa == 0 and config.type_k in FLOAT_TYPES and on_host
    return DEFAULT_KV_BYTES if cheap else 0


def sequences(kv_store_bytes: int, unified: bool) -> tuple[int, bool]:
    """The context's n_seq_max and kv_unified: a second sequence in one unified cache when evicted KV is kept for
    recall (restored runs come in on it, engine/recall_decoding.py); llama.cpp's defaults otherwise."""
    if not kv_store_bytes:
        return 1, unified
    return 2, True
