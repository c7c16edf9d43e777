"""Passkey accuracy of MorphKV scoring variants on Gemma 3 270M under a fixed budget.

usage: python benchmarks/passkey_variants.py BUDGET PROMPT_TOKENS TRIALS VARIANT [VARIANT ...]
VARIANT is aggregate,fusion,prefill_decay,pool_radius, e.g. mean,sum,0.95,1.
Trial i hides a 5-digit key at depth 0.05 + i / TRIALS with seed 300 + i.
Prints one line per trial and a RESULT line per variant.
"""

import sys
import time

from pymorph_edge import Llama, MorphKV
from pymorph_edge.bench.passkey import answer, filler_repeats_for, make_case
from pymorph_edge.model.default_model import default_model_path


def main() -> None:
    budget, n_tokens, trials = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    path = default_model_path()
    for v in sys.argv[4:]:
        agg, fusion, decay, pool = v.split(",")
        policy = MorphKV(window=32, fusion=fusion, aggregate=agg, prefill_decay=float(decay), pool_radius=int(pool))
        with Llama(path, kv_budget=budget, policy=policy) as llm:
            n_filler = filler_repeats_for(llm, n_tokens)
            ok, t0 = 0, time.time()
            for i in range(trials):
                case = make_case(n_filler, 0.05 + i / trials, 300 + i)
                hit, text = answer(llm, case)
                ok += hit
                print(v, i, case.key, repr(text), hit, llm.stats.tokens_decoded, flush=True)
            print("RESULT", budget, n_tokens, v, ok, f"/{trials}", f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
