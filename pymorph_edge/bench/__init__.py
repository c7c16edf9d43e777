"""`pymorph-edge bench`: MorphKV against the baseline policies on passkey, perplexity, fidelity, memory and speed."""
