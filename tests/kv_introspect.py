"""Reads llama.cpp's own record of which positions its cells hold, to cross-check the native cell map.

llama_state_seq_get_data writes a magic (u32) and the seq id (i32), then per KV cache (the non-SWA
one first on iSWA models): n_stream (u32), then per stream cell_count (u32) and, for each non-empty cell in cell order,
pos (i32), n_seq_id (u32) and the seq ids (i32 each), followed by the K/V data.
"""

from __future__ import annotations

import ctypes
import struct

import llama_cpp.llama_cpp as C


def llama_cell_positions(ctx: C.llama_context_p, seq_id: int = 0) -> list[int]:
    """Positions of the first KV cache's occupied cells, in cell order, as llama.cpp stores them."""
    size = C.llama_state_seq_get_size(ctx, seq_id)
    buf = (ctypes.c_uint8 * size)()
    written = C.llama_state_seq_get_data(ctx, buf, size, seq_id)
    data = bytes(buf[:written])
    _magic, seq, n_stream = struct.unpack_from("<IiI", data, 0)
    if seq != seq_id or n_stream != 1:
        raise ValueError(f"unexpected state header: seq {seq} (wanted {seq_id}), {n_stream} streams (wanted 1)")
    (cell_count,) = struct.unpack_from("<I", data, 12)
    off, positions = 16, []
    for _ in range(cell_count):
        pos, n_seq = struct.unpack_from("<iI", data, off)
        off += 8 + 4 * n_seq
        positions.append(pos)
    return positions
