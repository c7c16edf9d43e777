"""The docs cannot drift from the results: README.md's headline table is exactly what the headline results
folders render to, every results folder a page cites exists and is in benchmarks/figures.json (with the command
that regenerates it), and benchmarks/results/ holds nothing else."""

import json
import re
from pathlib import Path

from pymorph_edge.bench.headline_table import block_in, render

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CITED = re.compile(r"benchmarks/results/([A-Za-z0-9_.-]+)")


def manifest() -> dict[str, str]:
    return {
        e["folder"]: e["command"] for e in json.loads((ROOT / "benchmarks" / "figures.json").read_text())["folders"]
    }


def test_readme_headline_table_is_rendered_from_its_results():
    block = block_in((ROOT / "README.md").read_text())
    assert block is not None, "README.md lost its headline markers"
    assert block == render(RESULTS), (
        "README.md's headline table differs from the results: run benchmarks/regenerate.py --readme"
    )


def test_a_hand_edited_figure_is_caught():
    rendered = render(RESULTS)
    row = next(line for line in rendered.splitlines() if line.startswith("| ") and "%" in line)
    edited = rendered.replace(row, row.replace("%", "5%", 1))
    assert edited != rendered and edited != render(RESULTS)


def test_every_cited_folder_exists_and_is_in_the_manifest():
    known = manifest()
    for page in PAGES:
        for name in CITED.findall(page.read_text()):
            name = name.rstrip(".")
            assert name in known, (
                f"{page.name} cites benchmarks/results/{name}, which benchmarks/figures.json does not list"
            )
            assert (RESULTS / name).exists(), f"{page.name} cites benchmarks/results/{name}, which does not exist"


def test_results_holds_only_cited_folders_each_with_its_command():
    known = manifest()
    cited = {n.rstrip(".") for page in PAGES for n in CITED.findall(page.read_text())}
    on_disk = {p.name for p in RESULTS.iterdir()}
    assert on_disk == set(known), (
        f"not in benchmarks/figures.json: {sorted(on_disk - set(known))}; missing: {sorted(set(known) - on_disk)}"
    )
    assert set(known) <= cited, f"in the manifest but cited by no page: {sorted(set(known) - cited)}"
    for folder, command in known.items():
        assert f"benchmarks/results/{folder}" in command, f"{folder}'s command does not write to it: {command}"
