import sys, json, time
from pymorph_edge import Llama
import pymorph_edge.policies as P
from pymorph_edge.bench.passkey import FILLER, HEADER, make_case
from pymorph_edge.default_model import smollm2_model_path, gemma3_model_path

model = sys.argv[1]; budget = int(sys.argv[2]); ratios = [int(x) for x in sys.argv[3].split(",")]
variants = sys.argv[4:]
path = smollm2_model_path() if model == "smol" else gemma3_model_path()
depths = [0.05, 0.2, 0.35, 0.5, 0.65, 0.8]
for v in variants:
    name, kw = v.split(":", 1) if ":" in v else (v, "{}")
    kw = json.loads(kw)
    hwm = kw.pop('hw', None)
    res = []
    t0 = time.time()
    for ratio in ratios:
        with Llama(path, kv_budget=(None if name=='full' else budget), policy=P.make_policy(name, **kw), n_ctx=(8192 if name=='full' else None)) as llm:
            import hw; hw.apply(llm, hwm)
            per = len(llm.tokenize(FILLER * 10, add_bos=False)) / 10
            n_filler = max(1, int((budget * ratio - 80) / per))
            for i, d in enumerate(depths):
                case = make_case(n_filler, d, 300 + i)
                content = case.prompt.rsplit("\nQuestion:", 1)[0] + "\nWhat is the secret number?"
                out = llm.create_chat_completion([{"role": "user", "content": content}], max_tokens=24, temperature=0)
                text = out["choices"][0]["message"]["content"]
                # key survival: positions of the key's first mention
                hit = case.key in text
                res.append(hit)
                print(v, ratio, d, case.key, repr(text[:40]), hit, out["usage"]["prompt_tokens"], flush=True)
    print("RESULT", v, f"{sum(res)}/{len(res)}", f"{time.time()-t0:.0f}s", flush=True)
