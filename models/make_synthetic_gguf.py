"""Write tiny random-weight llama GGUFs for fast mechanism tests.

usage: python models/make_synthetic_gguf.py OUT_DIR   -> OUT_DIR/synthetic-mha.gguf, OUT_DIR/synthetic-gqa.gguf
"""

import sys
from pathlib import Path

from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "models/cache")
    out.mkdir(parents=True, exist_ok=True)
    print(write_synthetic_llama(out / "synthetic-mha.gguf", n_head=4, n_head_kv=4))
    print(write_synthetic_llama(out / "synthetic-gqa.gguf", n_head=8, n_head_kv=2))
