"""Owner of one native pme_state: the eval callback's user data, the cell map, scoring and eviction.

Every call into libpme for a context goes through here, in the manner of llama-cpp-python's
`_internals` handle owners, so the engine never touches cffi. Errors the C side reports come back
as RuntimeError with its message; a bad configuration is a ValueError from pme_create.
"""

from __future__ import annotations

import ctypes
from typing import Any

import llama_cpp.llama_cpp as C
import numpy as np

from pymorph_edge._native import native
from pymorph_edge.model.model_file import ModelInfo
from pymorph_edge.policies import KVPolicy


class NativeScorer:
    """The native state of one context. Create it before the context: its pointer is the callback's user data."""

    def __init__(
        self,
        policy: KVPolicy,
        info: ModelInfo,
        kv_budget: int,
        n_cells: int,
        max_ubatch: int,
        score_layers: int | None = None,
        rotate_layers: bool | str = False,
    ) -> None:
        ffi, lib = native()
        self._ffi, self._lib = ffi, lib
        cfg = ffi.new("pme_config *")
        for k, v in policy.native_fields().items():
            setattr(cfg, k, getattr(lib, v) if isinstance(v, str) else v)  # a str names a pme.h enum constant
        cfg.budget = kv_budget
        cfg.protect_recent = max(policy.protected_recent, info.n_swa)
        self.protected = int(cfg.protect_recent) + int(cfg.n_sink)  # cells the policy never offers for eviction
        cfg.n_cells = n_cells
        cfg.n_head, cfg.n_head_kv, cfg.n_layer = info.n_head, info.n_head_kv, info.n_layer
        cfg.max_ubatch = max_ubatch
        self.read_cap = score_layers  # layers read at most (None: all), see engine/layer_choice.py
        # with read_cap: a decode step reads the next share of the layers in turn ("chunks": long prompt chunks read
        # the chosen read_cap layers)
        self.rotates: bool | str = rotate_layers
        cfg.score_layers = score_layers or 0  # 0: every layer
        cfg.rotate_layers = 2 if rotate_layers == "chunks" else int(bool(rotate_layers))
        err = ffi.new("char[256]")
        st = lib.pme_create(cfg, err, 256)
        if st == ffi.NULL:
            raise ValueError(ffi.string(err).decode())
        self._state: Any = st
        self.n_cells = n_cells
        self._n_layer = info.n_layer
        self._pos_buf = ffi.new("int32_t[]", max_ubatch)
        self._stats = ffi.new("pme_stats *")

    def attach(self, cp: C.llama_context_params) -> None:
        """Install the eval callback with this state as its user data."""
        ffi, lib = self._ffi, self._lib
        # keep the ctypes function object alive as long as the context may call it
        self._cb = ctypes.cast(
            ctypes.c_void_p(int(ffi.cast("uintptr_t", lib.pme_eval_callback_ptr()))),
            C.ggml_backend_sched_eval_callback,
        )
        cp.cb_eval = self._cb
        cp.cb_eval_user_data = ctypes.c_void_p(int(ffi.cast("uintptr_t", self._state)))

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            raise RuntimeError(f"{what}: {self._ffi.string(self._lib.pme_last_error(self._state)).decode()}")
        return rc

    def _mem(self, mem: Any) -> Any:
        return self._ffi.cast("void *", mem)

    def begin(
        self,
        first_pos: int,
        m: int,
        last_chunk: bool,
        probe: bool = False,
        query: bool = False,
        superseded: bool = False,
        restore: bool = False,
    ) -> None:
        """Announce a ubatch of m tokens at positions first_pos.. (called before llama_decode). query: a key log
        probe, read for its queries only (see staged_query). superseded: a prompt chunk that a probe of at least
        the policy's window follows, so its last rows are never read (a non-host backend skips sending them)."""
        for i in range(m):
            self._pos_buf[i] = first_pos + i
        lib = self._lib
        if restore:
            flags = lib.PME_UB_RESTORE | (lib.PME_UB_PREFILL if m > 1 else 0)
        elif query:
            flags = lib.PME_UB_QUERY
        elif probe:
            flags = lib.PME_UB_PROBE
        else:
            flags = (lib.PME_UB_PREFILL if m > 1 else 0) | (lib.PME_UB_LAST if last_chunk else 0)
            flags |= lib.PME_UB_SUPERSEDED if superseded else 0
        self._check(lib.pme_begin_ubatch(self._state, self._pos_buf, m, flags), "begin ubatch")

    def live_cells(self) -> int:
        self._lib.pme_get_stats(self._state, self._stats)
        return int(self._stats.cells_in_use)

    def end(self) -> None:
        """Fold the ubatch's attention into the policy's state (after llama_decode)."""
        self._check(self._lib.pme_end_ubatch(self._state), "scoring")

    def evict(self, mem: Any, seq: int, next_pos: int) -> int:
        """Evict down to the budget with llama_memory_seq_rm; returns the tokens removed."""
        return self._check(self._lib.pme_evict(self._state, self._mem(mem), seq, next_pos), "eviction")

    def truncate(self, mem: Any, seq: int, from_pos: int) -> None:
        self._check(self._lib.pme_truncate(self._state, self._mem(mem), seq, from_pos), "truncate")

    def drop_range(self, mem: Any, seq: int, p0: int, p1: int) -> int:
        """Remove the cells at positions [p0, p1) whatever the policy would keep; returns the cells freed."""
        return self._check(self._lib.pme_drop_range(self._state, self._mem(mem), seq, p0, p1), "drop")

    def compact(self, mem: Any, seq: int, next_pos: int) -> int:
        """Renumber live positions 0..n_live-1; returns how far the newest position moved down."""
        return self._check(self._lib.pme_compact(self._state, self._mem(mem), seq, next_pos), "compaction")

    # -- the KV store (native/pme_kvstore.c): evicted rows that recall restores ---------------------
    def kvstore_enable(self, n_bytes: int) -> None:
        self._check(self._lib.pme_kvstore_enable(self._state, n_bytes), "KV store")

    def kvstore_arm(self, lpos: list[int]) -> list[int] | None:
        """Arm the saved rows of these logical positions for the next restore ubatch: their positions, or None when
        not all of them are saved."""
        pos = self._ffi.new("int32_t[]", max(len(lpos), 1))
        n = self._lib.pme_kvstore_arm(self._state, self._ffi.new("int64_t[]", lpos), len(lpos), pos)
        return list(pos[0 : len(lpos)]) if n == len(lpos) else None

    def kvstore_save_live(self, lpos: list[int]) -> int:
        """Save the rows of the live cells holding these logical positions; returns how many were live."""
        n = self._lib.pme_kvstore_save_live(self._state, self._ffi.new("int64_t[]", lpos), len(lpos))
        return self._check(n, "save live rows")

    def kvstore_place(self, pos0: int, lpos: list[int]) -> None:
        self._check(
            self._lib.pme_kvstore_place(self._state, pos0, self._ffi.new("int64_t[]", lpos), len(lpos)), "place"
        )

    def kvstore_bytes(self) -> int:
        return int(self._lib.pme_kvstore_bytes(self._state))

    def kvstore_mark(self) -> list[int] | None:
        """A test/benchmark hook: the KV store's rows as they are now, for kvstore_rewind after a load_state."""
        out = self._ffi.new("int64_t[4]")
        return list(out) if self._lib.pme_test_kvstore_mark(self._state, out) == 0 else None

    def kvstore_rewind(self, mark: list[int]) -> None:
        self._check(self._lib.pme_test_kvstore_rewind(self._state, self._ffi.new("int64_t[4]", mark)), "rewind")

    def kvstore_rotates(self) -> bool:
        """Whether a restore may be decoded at new positions, its K rows re-rotated as they are written."""
        return bool(self._lib.pme_kvstore_rotates(self._state))

    def min_live_tail(self, next_pos: int) -> int:
        return int(self._lib.pme_min_live_tail(self._state, next_pos))

    def set_pins(self, n_keep: int, lo: int, hi: int) -> None:
        """Positions [0, n_keep) and [lo, hi) are never evicted (native/pme_pins.c)."""
        self._check(self._lib.pme_set_pins(self._state, n_keep, lo, hi), "pins")

    def mark_recalled(self, pos0: int, lpos: list[int]) -> None:
        """The block just decoded at pos0.. takes these logical positions; the next tokens keep theirs."""
        buf = self._ffi.new("int64_t[]", lpos)
        self._check(self._lib.pme_mark_recalled(self._state, pos0, len(lpos), buf), "recall")

    def skip_positions(self, n: int) -> None:
        """The next tokens go n positions lower and keep their logical positions (see pme_skip_positions)."""
        self._check(self._lib.pme_skip_positions(self._state, n), "skip positions")

    def cell_lpos(self) -> list[int]:
        """Logical position of each cell (-1 free): the sequence index, or a recalled block's own label."""
        out = self._ffi.new("int64_t[]", self.n_cells)
        n = self._check(self._lib.pme_cell_lpos(self._state, out, self.n_cells), "cell lpos")
        return list(out[0:n])

    def cell_positions(self) -> list[int]:
        out = self._ffi.new("int32_t[]", self.n_cells)
        n = self._lib.pme_cell_positions(self._state, out, self.n_cells)
        return list(out[0:n])

    def scores(self) -> list[float]:
        """Each cell's selection score from the last eviction pass (higher = kept), for tests and probes."""
        out = self._ffi.new("float[]", self.n_cells)
        n = self._check(self._lib.pme_test_scores(self._state, out, self.n_cells), "scores")
        return list(out[0:n])

    def fattn_check(self, enable: bool) -> dict[str, float]:
        """Test hook (pme_test_fattn_check in pme.h): while enabled, flash attention nodes have their output rebuilt
        from the recomputed rows, and softmax nodes their rows recomputed the flash attention way. Returns the
        differences found since it was enabled."""
        out = self._ffi.new("float[4]")
        self._check(self._lib.pme_test_fattn_check(self._state, int(enable), out), "fattn check")
        return {"max_abs": float(out[0]), "max_ref": float(out[1]), "max_rel": float(out[2]), "nodes": int(out[3])}

    def stats(self) -> dict[str, int]:
        self._lib.pme_get_stats(self._state, self._stats)
        s = self._stats
        return {name: int(getattr(s, name)) for name, _ in self._ffi.typeof("pme_stats").fields}

    def reset(self) -> None:
        self._lib.pme_reset(self._state)

    def force_copy(self, enable: bool) -> None:
        """Test hook: read every tensor through ggml_backend_tensor_get, as for a GPU's buffers, so the non-host
        path and its byte counters run on the CPU backend."""
        self._check(self._lib.pme_test_force_copy(self._state, int(enable)), "force copy")

    _BACKEND_SCORE_MODES = {"auto": 0, "always": 1, "never": 2}

    def backend_scores(self, mode: str) -> None:
        """Test hook: where attention is reduced to scores (native/pme_devscore.c). "auto": on the attention's own
        backend when it is outside host memory; "always": on a backend for host tensors too (the CPU backend);
        "never": the host path, copying a non-host tensor over."""
        if mode not in self._BACKEND_SCORE_MODES:
            raise ValueError(f"backend_scores mode must be one of {sorted(self._BACKEND_SCORE_MODES)}, got {mode!r}")
        self._check(self._lib.pme_test_backend_scores(self._state, self._BACKEND_SCORE_MODES[mode]), "backend scores")

    # -- key log (native/pme_keylog.c) ---------------------------------------------------------
    def enable_keylog(self, d_k: int) -> None:
        """From now on every ubatch stages its keys at each scored layer (0 turns it off)."""
        self._check(self._lib.pme_keylog_enable(self._state, d_k), "key log")
        self._d_k = d_k

    def cache_layers(self) -> list[int]:
        """The layers of the scored cache (read or not), as the first ubatch's graph showed them."""
        out = self._ffi.new("int8_t[]", 4096)
        n = self._check(self._lib.pme_layer_groups(self._state, out, 4096), "layer groups")
        return [il for il in range(n) if out[il]]

    def scored_layers(self) -> list[int]:
        """The layers of the scored cache that are read (EngineConfig.score_layers), as the last ubatch's graph
        showed them."""
        out = self._ffi.new("int8_t[]", 4096)
        n = self._check(self._lib.pme_scored_layers(self._state, out, 4096), "scored layers")
        return [il for il in range(n) if out[il]]

    def keylog_layers(self, layers: list[int] | None) -> None:
        """Stage keys (and a probe's queries) at these layers only, from the next ubatch on (None: every layer)."""
        if layers is None:
            self._check(self._lib.pme_keylog_layers(self._state, self._ffi.NULL, 0), "key log layers")
            return
        self._check(self._lib.pme_keylog_layers(self._state, self._layer_mask(layers), self._n_layer), "key log layers")

    def read_layers(self, layers: list[int]) -> None:
        """Read exactly these layers of the scored cache from the next ubatch on (see engine/layer_choice.py)."""
        n = self._n_layer
        if not layers or any(not 0 <= il < n for il in layers):
            raise ValueError(f"layers to read must be a non-empty subset of range({n}), got {layers!r}")
        self._check(self._lib.pme_set_scored_layers(self._state, self._layer_mask(layers), n), "scored layers")

    def _layer_mask(self, layers: list[int]) -> Any:
        """(n_layer) int8 flags, 1 for each layer in layers, as the native layer setters take them."""
        chosen = set(layers)
        return self._ffi.new("int8_t[]", [1 if il in chosen else 0 for il in range(self._n_layer)])

    def staged_keys(self, layers: list[int], m: int, n_head_kv: int) -> np.ndarray | None:
        """(m, len(layers), n_head_kv, d_k) f16 keys the last ubatch wrote; None if a layer was not read."""
        out = np.empty((m, len(layers), n_head_kv, self._d_k), np.float16)
        for j, il in enumerate(layers):
            ptr = self._lib.pme_keylog_keys(self._state, il)
            if ptr == self._ffi.NULL:
                return None
            n = m * n_head_kv * self._d_k
            out[:, j] = np.frombuffer(self._ffi.buffer(ptr, 2 * n), np.float16).reshape(m, n_head_kv, self._d_k)
        return out

    def staged_query(self, layers: list[int], n_head: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The last query probe's rows: ((len(layers), n_rows, n_head, d_k) f32, per-layer scales) or None."""
        rows, scale = self._ffi.new("int32_t *"), self._ffi.new("float *")
        qs, scales = [], []
        for il in layers:
            ptr = self._lib.pme_keylog_query(self._state, il, rows, scale)
            if ptr == self._ffi.NULL:
                return None
            n = int(rows[0]) * n_head * self._d_k
            qs.append(np.frombuffer(self._ffi.buffer(ptr, 4 * n), np.float32).reshape(int(rows[0]), n_head, -1).copy())
            scales.append(float(scale[0]))
        return np.stack(qs), np.array(scales, np.float32)

    # -- sessions (native/pme_session.c) ---------------------------------------------------------
    def save_state(self) -> bytes:
        """The live cells' positions and scores, in cell order (how llama.cpp writes a sequence's state)."""
        n = self._check(self._lib.pme_session_size(self._state), "save scorer state")
        buf = self._ffi.new("char[]", max(n, 1))
        self._check(self._lib.pme_session_save(self._state, buf, n), "save scorer state")
        return bytes(self._ffi.buffer(buf, n))

    def load_state(self, data: bytes) -> None:
        """Restore save_state(); ValueError (state untouched) when data does not fit this scorer."""
        buf = self._ffi.from_buffer("char[]", data) if data else self._ffi.new("char[]", 1)
        if self._lib.pme_session_load(self._state, buf, len(data)) < 0:
            raise ValueError(self._ffi.string(self._lib.pme_last_error(self._state)).decode())

    def close(self) -> None:
        if self._state is not None:
            self._lib.pme_free(self._state)
            self._state = None

    # -- per-head weights (native/pme_head_weights.c) --------------------------------------------
    def set_head_weights(self, weights: list[float] | None) -> None:
        if weights is None:
            self._check(self._lib.pme_set_head_weights(self._state, self._ffi.NULL, 0), "head weights")
            return
        buf = self._ffi.new("float[]", [float(w) for w in weights])
        self._check(self._lib.pme_set_head_weights(self._state, buf, len(weights)), "head weights")

    def calibrate(self, target_pos: list[int]) -> None:
        """Arm the next ubatch to measure each head's attention on target_pos[row] (-1: none)."""
        buf = self._ffi.new("int32_t[]", target_pos)
        self._check(self._lib.pme_calibrate(self._state, buf, len(target_pos)), "calibration")

    def calibration_scores(self, n: int) -> list[float]:
        out = self._ffi.new("float[]", n)
        self._check(self._lib.pme_calibration_scores(self._state, out, n), "calibration")
        return list(out)
