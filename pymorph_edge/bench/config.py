"""Benchmark configuration: a JSON file, validated here, plus the seed that makes a run reproducible."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("passkey", "ppl", "fidelity", "memory", "speed", "longrun")


@dataclass
class BenchConfig:
    model: str = "default"  # a GGUF path, "default" (Gemma 3 270M), "gemma3-270m", "smollm2-135m" or "synthetic"
    budget: int = 1024
    n_ubatch: int = 512
    seed: int = 0
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    policies: list[dict[str, Any]] = field(default_factory=lambda: [{"name": "full"}, {"name": "morphkv"}])
    passkey_multipliers: list[float] = field(default_factory=lambda: [2, 4, 8])
    passkey_depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    ppl_texts: list[str] = field(default_factory=list)  # empty: the default offline texts
    ppl_tokens: int = 3072  # tokens per text; the first `budget` are the prefix, the rest are scored one by one
    fidelity_tokens: int = 2048
    fidelity_segment: int = 256
    memory_lengths: list[int] = field(default_factory=lambda: [1024, 4096, 16384])
    speed_decode_tokens: int = 256
    longrun_prefix: int = 256  # prompt before teacher-forced scoring starts
    longrun_tokens: int = 24576  # tokens scored one by one (3x SmolLM2's n_ctx_train)
    longrun_segment: int = 2048  # ppl is reported per segment of this many tokens
    n_gpu_layers: int = 0  # layers offloaded, as llama.cpp's -ngl (-1: all); a policy spec may set its own

    def __post_init__(self) -> None:
        bad = [t for t in self.tasks if t not in TASKS]
        if bad:
            raise ValueError(f"unknown tasks {bad}; choose from {list(TASKS)}")
        for name in (
            "budget",
            "n_ubatch",
            "ppl_tokens",
            "fidelity_tokens",
            "fidelity_segment",
            "speed_decode_tokens",
            "longrun_prefix",
            "longrun_tokens",
            "longrun_segment",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.n_gpu_layers, bool) or not isinstance(self.n_gpu_layers, int) or self.n_gpu_layers < -1:
            raise ValueError(f"n_gpu_layers must be an int >= -1 (-1: all layers), got {self.n_gpu_layers!r}")
        if not self.policies or not all(isinstance(p, dict) and "name" in p for p in self.policies):
            raise ValueError("policies must be a non-empty list of {'name': ..., ...} objects")
        if not all(0 <= d <= 1 for d in self.passkey_depths):
            raise ValueError(f"passkey_depths must lie in [0, 1], got {self.passkey_depths}")

    @classmethod
    def load(cls, path: str | Path) -> BenchConfig:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"benchmark config not found: {str(p)!r}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"benchmark config {str(p)!r} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"benchmark config {str(p)!r} must hold a JSON object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown keys in {str(p)!r}: {sorted(unknown)}")
        return cls(**data)


def policy_label(spec: dict[str, Any]) -> str:
    return spec.get("label") or spec["name"]
