"""Load run against `pymorph-edge serve` on loopback: K concurrent openai clients for M minutes, mixing chat,
streaming chat, completions, abandoned streams and continued conversations. Writes results.json,
results.md and load.png to --out.

    python benchmarks/load.py --model smollm2-135m --clients 6 --minutes 5 --out benchmarks/results/load-smollm2
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pymorph_edge.bench.load_run import run_load, write_report
from pymorph_edge.model.default_model import resolve_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, gemma3-270m or a GGUF path")
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--kv-budget", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    result = run_load(str(resolve_model(a.model)), a.clients, a.minutes * 60, a.kv_budget, a.max_tokens, a.seed)
    write_report(result, a.out, "python " + " ".join(shlex.quote(x) for x in sys.argv))
    print((a.out / "results.md").read_text())
    return 0 if result["summary"]["status_5xx"] == 0 and result["server_alive_at_end"] else 1


if __name__ == "__main__":
    sys.exit(main())
