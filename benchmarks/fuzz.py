"""The full fault campaign: damaged GGUFs (each loaded in a worker process, crashes and hangs counted) and
generated request bodies against a running server. Writes results.json and results.md to --out.

    python benchmarks/fuzz.py --gguf 400 --requests 2000 --out benchmarks/results/fuzz
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
from collections import Counter
from pathlib import Path

from pymorph_edge.bench.gguf_fuzz import campaign
from pymorph_edge.bench.load_run import start_server
from pymorph_edge.bench.request_fuzz import post_body, request_bodies
from pymorph_edge.model.default_model import resolve_model
from pymorph_edge.model.synthetic_gguf import write_synthetic_llama


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=int, default=400, help="damaged copies of each model")
    p.add_argument("--models", default="synthetic,smollm2-135m", help="comma-separated: synthetic, smollm2-135m, ...")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pme-fuzz-"))
    synthetic = write_synthetic_llama(work / "synthetic.gguf", n_head=8, n_head_kv=2)
    results: dict[str, object] = {"gguf": {}, "requests": {}}
    for name in a.models.split(","):
        model = synthetic if name == "synthetic" else resolve_model(name)
        r = campaign(Path(model), a.gguf, work / name, seed=a.seed, timeout_s=120)
        results["gguf"][name] = r  # type: ignore[index]
        print(name, r["counts"], flush=True)
    proc, port = start_server(str(synthetic), 128, ["--max-tokens-limit", "8"])
    try:
        codes: Counter[int] = Counter()
        fails = []
        for i, (path, body) in enumerate(request_bodies(random.Random(a.seed), a.requests)):
            code = post_body(port, path, body)
            codes[code] += 1
            if code >= 500:
                fails.append({"i": i, "path": path, "body": body.decode("utf-8", "replace")[:500], "status": code})
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(15)
    results["requests"] = {"n": a.requests, "status_counts": dict(codes), "5xx": fails, "server_alive": alive}
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    cmd = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    lines = [
        f"# Fault campaign\n\nCommand: `{cmd}`\n",
        "| GGUF | damaged copies | loaded | ValueError | crash | hang | other |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["gguf"].items():  # type: ignore[union-attr]
        c = r["counts"]
        other = sum(v for k, v in c.items() if k not in ("loaded", "value_error", "crash", "hang"))
        lines.append(
            f"| {name} | {r['n']} | {c.get('loaded', 0)} | {c.get('value_error', 0)} | {c.get('crash', 0)} | {c.get('hang', 0)} | {other} |"
        )
    lines += [
        "",
        f"Requests: {a.requests} generated bodies against `serve` (synthetic model): status counts {dict(sorted(codes.items()))}; "
        f"5xx: {len(fails)}; server alive at the end: {alive}.",
    ]
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print((a.out / "results.md").read_text())
    bad = any(r["counts"].get(k, 0) for r in results["gguf"].values() for k in ("crash", "hang", "other"))  # type: ignore[union-attr]
    return 1 if bad or fails or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
