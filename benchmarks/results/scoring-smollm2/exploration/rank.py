import sys, json
from pymorph_edge import Llama
import pymorph_edge.policies as P
from pymorph_edge.bench.passkey import FILLER, make_case
from pymorph_edge.default_model import smollm2_model_path
budget=int(sys.argv[1]); ratio=int(sys.argv[2]); depth=float(sys.argv[3]); kw=json.loads(sys.argv[4]) if len(sys.argv)>4 else {}; kw0=dict(kw); kw.pop("seed", None)
hwm = kw.pop('hw', None)
with Llama(smollm2_model_path(), kv_budget=budget, policy=P.make_policy(kw.pop("policy","morphkv"), **kw)) as llm:
    import hw; hw.apply(llm, hwm)
    per = len(llm.tokenize(FILLER * 10, add_bos=False)) / 10
    n_filler = max(1, int((budget * ratio - 80) / per))
    case = make_case(n_filler, depth, int(kw0.get("seed", 301)))
    content = case.prompt.rsplit("\nQuestion:", 1)[0] + "\nWhat is the secret number?"
    prompt, _, has_bos = llm._formatter().prompt([{"role":"user","content":content}])
    toks = llm.tokenize(prompt, add_bos=not has_bos, special=True)
    i0 = prompt.index("The secret number is")
    i1 = prompt.index("in mind.") + 8
    a = len(llm.tokenize(prompt[:i0], add_bos=not has_bos, special=True)); b = len(llm.tokenize(prompt[:i1], add_bos=not has_bos, special=True))
    print("key span", a, b, llm.detokenize(toks[a:b]))
    eng = llm.engine; eng.reset()
    for s in ([0] if kw0.get("prefill_probe") else range(0, len(toks), 512)):
        eng.decode(toks[s:s+512] if not kw0.get("prefill_probe") else toks)
        live = set(eng.cell_positions())
        kept = [p for p in range(a, b) if p in live]
        print(f"after chunk ending {min(s+512,len(toks))}: key tokens kept {len(kept)}/{b-a}:", repr(llm.detokenize([toks[p] for p in kept])))
    # scores of the last selection pass
    sc = eng.scorer
    ffi, lib = sc._ffi, sc._lib
    n = eng.n_ctx
    buf = ffi.new("float[]", n); lib.pme_test_scores(sc._state, buf, n)
    pos = eng.cell_positions()
    pairs = sorted([(buf[c], pos[c]) for c in range(n) if pos[c] >= 0], reverse=True)
    import statistics
    print("n live", len(pairs), "median", statistics.median([p[0] for p in pairs]))
    print("top:", [(round(s,4), p, llm.detokenize([toks[p]])) for s,p in pairs[:25]])
    print("key:", [(round(buf[c],4), pos[c], llm.detokenize([toks[pos[c]]])) for c in range(n) if a <= pos[c] < b])
