"""A streaming chat loop in a few lines: each turn continues on the compressed KV cache.

usage: python examples/chat_loop.py [MODEL.gguf]     (type a message, empty line to quit)
"""

import sys

from pymorph_edge import Llama
from pymorph_edge.model.default_model import default_model_path

model = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
with Llama(model, kv_budget=1024) as llm:
    messages = []
    while line := input("> ").strip():
        messages.append({"role": "user", "content": line})
        reply = ""
        for chunk in llm.create_chat_completion(messages, max_tokens=256, stream=True):
            piece = chunk["choices"][0]["delta"].get("content", "")
            reply += piece
            print(piece, end="", flush=True)
        print(
            f"\n  [kv cells {llm.stats.cells_in_use}/{llm.kv_budget}, reused {llm.last_timings.cached_tokens} prompt tokens]"
        )
        messages.append({"role": "assistant", "content": reply})
