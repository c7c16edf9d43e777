# per-head: key digit survival after prefill at 4x, pscore only (no probe)
import sys, json, statistics
from pymorph_edge import Llama
import pymorph_edge.policies as P
from pymorph_edge.bench.passkey import FILLER, make_case
from pymorph_edge.default_model import smollm2_model_path
budget=512; ratio=4
for h in range(1, 91):
    with Llama(smollm2_model_path(), kv_budget=budget, policy=P.make_policy("morphkv", pool_radius=0, only_head=h)) as llm:
        per = len(llm.tokenize(FILLER * 10, add_bos=False)) / 10
        n_filler = max(1, int((budget * ratio - 80) / per))
        tot=0
        for d, seed in ((0.1, 301), (0.4, 302)):
            case = make_case(n_filler, d, seed)
            content = case.prompt.rsplit("\nQuestion:", 1)[0] + "\nWhat is the secret number?"
            prompt, _, has_bos = llm._formatter().prompt([{"role":"user","content":content}])
            toks = llm.tokenize(prompt, add_bos=not has_bos, special=True)
            i0 = prompt.index("The secret number is") ; i1 = prompt.index(". Keep")
            a = len(llm.tokenize(prompt[:i0], add_bos=not has_bos, special=True)); b = len(llm.tokenize(prompt[:i1], add_bos=not has_bos, special=True))
            eng = llm.engine; eng.reset()
            eng.decode(toks[:-40])  # up to before the question
            live = set(eng.cell_positions())
            tot += sum(1 for p in range(a, b) if p in live)
        print(h, (h-1)//3, (h-1)%3, tot, flush=True)
