"""Regenerate every figure README.md and docs/ quote: rerun the command behind each results folder listed in
benchmarks/figures.json, at the current defaults, then rewrite the README's headline block from the new results.

usage: python benchmarks/regenerate.py                 # everything (hours on 2 cores)
       python benchmarks/regenerate.py --only headline-smollm2,headline-gemma3
       python benchmarks/regenerate.py --list          # the folders and their commands
       python benchmarks/regenerate.py --readme        # only re-render the README block from the results on disk

Run it on a quiet machine: the speed columns are ratios measured within one run, and a second process on the
same cores makes them meaningless. tests/test_docs_figures.py fails when README.md's block and the results
folders disagree, or when a doc cites a folder this manifest does not know.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "benchmarks" / "figures.json"
RESULTS = ROOT / "benchmarks" / "results"


def manifest() -> list[dict]:
    return json.loads(MANIFEST.read_text())["folders"]


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from pymorph_edge.bench.headline_table import rewrite

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated folder names from benchmarks/figures.json")
    ap.add_argument("--list", action="store_true", help="print each folder and its command, run nothing")
    ap.add_argument("--readme", action="store_true", help="only re-render README.md's headline block")
    args = ap.parse_args()
    entries = manifest()
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {e["folder"] for e in entries}
        if unknown:
            ap.error(f"not in benchmarks/figures.json: {sorted(unknown)}")
        entries = [e for e in entries if e["folder"] in wanted]
    if args.list:
        for e in entries:
            sys.stdout.write(f"{e['folder']}: {e['command']}\n")
        return 0
    if not args.readme:
        for e in entries:
            sys.stdout.write(f"== {e['folder']}: {e['command']}\n")
            sys.stdout.flush()
            subprocess.run(shlex.split(e["command"]), cwd=ROOT, check=True)
    changed = rewrite(ROOT / "README.md", RESULTS)
    sys.stdout.write(f"README.md headline block {'rewritten' if changed else 'unchanged'}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
