"""Drive the native scorer directly with synthetic attention."""

import numpy as np

from pymorph_edge._native import native


class NativeState:
    def __init__(
        self,
        n_cells=16,
        budget=8,
        window=4,
        fusion=0,
        aggregate=0,
        n_head=1,
        n_head_kv=1,
        protect=None,
        decay=0.95,
        policy=0,
        n_sink=0,
        pool=0,
        forget=1.0,
        pool_prompt_only=0,
    ):
        self.ffi, self.lib = native()
        cfg = self.ffi.new("pme_config *")
        cfg.policy, cfg.budget, cfg.window, cfg.fusion, cfg.aggregate = policy, budget, window, fusion, aggregate
        cfg.n_sink, cfg.pool_radius, cfg.pool_prompt_only = n_sink, pool, pool_prompt_only
        cfg.prefill_decay, cfg.forget = decay, forget
        cfg.protect_recent = window if protect is None else protect
        cfg.n_cells, cfg.n_head, cfg.n_head_kv, cfg.n_layer, cfg.max_ubatch = n_cells, n_head, n_head_kv, 4, 64
        err = self.ffi.new("char[256]")
        self.st = self.lib.pme_create(cfg, err, 256)
        assert self.st != self.ffi.NULL, self.ffi.string(err)
        self.n_cells, self.n_head = n_cells, n_head

    def set_cells(self, positions):
        arr = self.ffi.new("int32_t[]", list(positions))
        assert self.lib.pme_test_set_cells(self.st, arr, len(positions)) == 0

    def step(self, attn, positions, prefill=None):
        """attn: (n_head, n_tokens, n_kv) for one layer, or a list of such arrays (one per layer)."""
        layers = attn if isinstance(attn, list) else [attn]
        n_tok = layers[0].shape[1]
        pos = self.ffi.new("int32_t[]", list(positions))
        is_prefill = (n_tok > 1) if prefill is None else prefill
        assert self.lib.pme_begin_ubatch(self.st, pos, n_tok, int(is_prefill)) == 0, self.error
        for a in layers:
            a = np.ascontiguousarray(a, dtype=np.float32)
            buf = self.ffi.from_buffer("float[]", a)
            assert self.lib.pme_test_observe(self.st, buf, a.shape[2], a.shape[1], a.shape[0]) == 0, self.error
        assert self.lib.pme_end_ubatch(self.st) == 0, self.error

    def select(self, next_pos):
        out = self.ffi.new("int32_t[]", self.n_cells)
        n = self.lib.pme_test_select(self.st, next_pos, out, self.n_cells)
        return list(out[0:n])

    @property
    def error(self):
        return self.ffi.string(self.lib.pme_last_error(self.st)).decode()

    def close(self):
        self.lib.pme_free(self.st)
