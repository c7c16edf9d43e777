import sys, itertools, os
from pymorph_edge import Llama
from pymorph_edge.engine.engine_config import EngineConfig
p = sys.argv[1]
for kw in ({"n_gpu_layers": 0}, {"n_gpu_layers": 10}, {"n_gpu_layers": 0, "scores": "never"}):
    kw = dict(kw); mode = kw.pop("scores", None)
    try:
        with Llama(p, kv_budget=256, config=EngineConfig(n_ubatch=128, flash_attn=True), **kw) as llm:
            if mode: llm.engine.scorer.backend_scores(mode)
            t = list(itertools.islice(llm.generate(llm.tokenize(b"Hello there. " * 100), temp=0.0), 4))
            print("OK", kw, mode, t, llm.stats.layers_scored, llm.stats.tokens_evicted, flush=True)
    except Exception as e:
        print("FAIL", kw, mode, type(e).__name__, e, flush=True)
