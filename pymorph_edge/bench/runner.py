"""Runs the configured tasks for every policy and writes results.json, results.md and bench.png."""

from __future__ import annotations

import json
import logging
import platform
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pymorph_edge.bench.config import BenchConfig, policy_label

from . import report, task_fidelity, task_longrun, task_memory_speed, task_passkey, task_ppl

logger = logging.getLogger(__name__)


def resolve_model(cfg: BenchConfig, out_dir: Path) -> str:
    from pymorph_edge.model.default_model import PACKAGED_MODELS, default_model_path

    if cfg.model == "default":
        return str(default_model_path())
    if cfg.model in PACKAGED_MODELS:
        return str(PACKAGED_MODELS[cfg.model]())
    if cfg.model == "synthetic":
        from pymorph_edge.model.synthetic_gguf import write_synthetic_llama

        return str(write_synthetic_llama(out_dir / "synthetic-gqa.gguf", n_head=8, n_head_kv=2, seed=cfg.seed))
    return cfg.model


def _machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def run(cfg: BenchConfig, out_dir: Path, command: str, merge: bool = False) -> dict[str, Any]:
    """merge=True keeps the other tasks' results already in out_dir/results.json (re-running some tasks)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(cfg, out_dir)
    results: dict[str, Any] = {
        "command": command,
        "machine": _machine(),
        "model": Path(model).name,
        "config": asdict(cfg),
        "tasks": {},
    }
    previous = out_dir / "results.json"
    if merge and previous.is_file():
        old = json.loads(previous.read_text())
        results["tasks"] = {k: v for k, v in old["tasks"].items() if k not in cfg.tasks}
        results["config"] = {
            **old["config"],
            **{k: v for k, v in asdict(cfg).items() if k != "tasks"},
            "tasks": list(dict.fromkeys(old["config"]["tasks"] + cfg.tasks)),
        }
        results["command"] = f"{old['command']}; then {command}"
    ref = None
    for task in cfg.tasks:
        rows = []
        if task == "fidelity":
            with tqdm(
                total=cfg.fidelity_tokens, desc="fidelity reference (full cache)", unit="tok", file=sys.stderr
            ) as bar:
                ref = task_fidelity.reference(cfg, model, bar.update)
        for spec in cfg.policies:
            spec = {"n_gpu_layers": cfg.n_gpu_layers, **spec}  # the config's offload unless the spec sets one
            label = policy_label(spec)
            total = {
                "passkey": len(cfg.passkey_multipliers) * len(cfg.passkey_depths),
                "ppl": None,
                "fidelity": cfg.fidelity_tokens,
                "memory": len(cfg.memory_lengths),
                "speed": 1,
                "longrun": cfg.longrun_tokens,
            }[task]
            with tqdm(total=total, desc=f"{task} {label}", file=sys.stderr) as bar:
                tick = lambda k=1: bar.update(k)  # noqa: E731
                try:
                    if task == "passkey":
                        rows.append(task_passkey.run(cfg, model, spec, tick))
                    elif task == "ppl":
                        rows.append(task_ppl.run(cfg, model, spec, tick))
                    elif task == "fidelity":
                        rows.append(task_fidelity.run(cfg, model, spec, ref, tick))
                    elif task == "longrun":
                        rows.append(task_longrun.run(cfg, model, spec, tick))
                    elif task == "memory":
                        rows.append(task_memory_speed.memory(cfg, model, spec, tick))
                    else:
                        rows.append(task_memory_speed.speed(cfg, model, spec, tick))
                except ValueError as exc:  # the policy cannot run on this model (e.g. context shift on iSWA)
                    logger.warning("%s %s: %s", task, label, exc)
                    rows.append({"policy": label, "unsupported": str(exc)})
        results["tasks"][task] = rows
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))  # keep partial results
    (out_dir / "results.md").write_text(report.markdown(results))
    report.plots(results, out_dir)
    return results
