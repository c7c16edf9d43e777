import random
import llama_cpp.llama_cpp as C
def induction_scores(llm, L=100, seed=0):
    eng = llm.engine; info = eng.model.info; vocab = eng.model.vocab
    rng = random.Random(seed)
    pool = [t for t in rng.sample(range(llm.n_vocab), 4000) if C.llama_vocab_get_attr(vocab, t) == C.LLAMA_TOKEN_ATTR_NORMAL]
    R = pool[:L]
    toks = [llm.token_bos()] + R + R
    targets = [-1] * len(toks)
    for i in range(L - 1):
        targets[1 + L + i] = 2 + i
    eng.reset(); eng.scorer.calibrate(targets); eng.decode(toks)
    s = eng.scorer.calibration_scores(info.n_layer * info.n_head_kv)
    eng.reset()
    return s
def apply(llm, mode):
    if not mode: return
    s = induction_scores(llm)
    m = max(s)
    if mode == "lin": w = [x / m for x in s]
    elif mode == "sq": w = [(x / m) ** 2 for x in s]
    elif mode.startswith("thr"):
        t = float(mode[3:]); w = [1.0 if x >= t else 0.0 for x in s]
    elif mode.startswith("mix"):
        a = float(mode[3:]); w = [a + x / m for x in s]
    llm.engine.scorer.set_head_weights(w)
