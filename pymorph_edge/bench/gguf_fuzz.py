"""Damaged GGUF files, and loading each in a worker process so that a crash or a hang is counted, not suffered.

Corruptions are seeded and target the parts of a GGUF a loader trusts: the fixed header (magic,
version, counts), the metadata key/values, the tensor infos (names, shapes, types, offsets), the data,
and truncation anywhere. The contract being tested: every file either loads and generates, or gives a
ValueError; none crashes the process or hangs it.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf

HEADER_END = 24  # magic u32, version u32, tensor_count u64, kv_count u64


@dataclass
class Corruption:
    name: str
    data: bytes


def regions(path: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges of a GGUF's header, metadata, tensor infos and data."""
    r = gguf.GGUFReader(str(path))
    ti_start = min(t.field.offset for t in r.tensors)
    size = path.stat().st_size
    return {
        "header": (0, HEADER_END),
        "metadata": (HEADER_END, ti_start),
        "tensor_info": (ti_start, r.data_offset),
        "data": (r.data_offset, size),
    }


def corruptions(path: Path, n: int, seed: int = 0) -> Iterator[Corruption]:
    """n damaged copies of the GGUF at path, cycling through the kinds of damage."""
    data = path.read_bytes()
    reg = regions(path)
    rng = random.Random(seed)
    kinds = ["truncate", "header", "metadata", "tensor_info", "metadata_u64", "tensor_info_u64", "data"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        buf = bytearray(data)
        if kind == "truncate":
            cut = rng.choice([rng.randrange(0, HEADER_END), rng.randrange(0, reg["data"][0]), rng.randrange(len(data))])
            yield Corruption(f"{i:03d}-truncate@{cut}", bytes(buf[:cut]))
            continue
        region = kind.removesuffix("_u64")
        lo, hi = reg[region]
        if kind.endswith("_u64"):
            # a length or count field gone huge, negative or zero: what overflows a naive parser
            off = rng.randrange(lo, max(lo + 1, hi - 8))
            value = rng.choice([2**63 - 1, 2**64 - 1, 2**32, 2**31 - 1, 0, 1 << 40])
            buf[off : off + 8] = value.to_bytes(8, "little")
            yield Corruption(f"{i:03d}-{kind}@{off}={value}", bytes(buf))
            continue
        flips = rng.randint(1, 4)
        offs = [rng.randrange(lo, hi) for _ in range(flips)]
        for off in offs:
            buf[off] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
        yield Corruption(f"{i:03d}-{kind}@{','.join(map(str, offs))}", bytes(buf))


# Results go to a private copy of stdout: llama.cpp and ggml print to fd 1 (an abort prints a backtrace),
# which would otherwise interleave with them.
WORKER = r"""
import os, sys
out = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
def print(msg, flush=True):
    out.write(msg + "\n")
    out.flush()
from pymorph_edge import EngineConfig, Llama
for line in sys.stdin:
    path = line.strip()
    try:
        with Llama(path, kv_budget=None, config=EngineConfig(n_ctx=64)) as llm:
            llm.create_completion("hi", max_tokens=2, temperature=0)
        print("loaded", flush=True)
    except ValueError:
        print("value_error", flush=True)
    except Exception as exc:
        print("other:" + type(exc).__name__ + ":" + str(exc).replace("\n", " ")[:200], flush=True)
"""


class LoadWorker:
    """One Python process that loads files on request, restarted after a crash or a hang."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", WORKER],
                env={**os.environ, "GGML_NO_BACKTRACE": "1"},  # an abort would attach gdb to print one
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self.proc

    def load(self, path: Path) -> str:
        """ "loaded", "value_error", "other:...", "crash:<rc>" or "hang"."""
        import selectors

        proc = self._start()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(f"{path}\n")
        proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if sel.select(timeout=0.2):
                line = proc.stdout.readline()
                if line:
                    return line.strip()
                return f"crash:{proc.wait(5)}"
            if proc.poll() is not None:
                return f"crash:{proc.returncode}"
        proc.kill()
        proc.wait(5)
        return "hang"

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(10)


def campaign(model: Path, n: int, workdir: Path, seed: int = 0, timeout_s: float = 60.0) -> dict[str, object]:
    """Load n corruptions of model; returns the outcome of each and their counts."""
    workdir.mkdir(parents=True, exist_ok=True)
    worker = LoadWorker(timeout_s)
    outcomes: dict[str, str] = {}
    try:
        for c in corruptions(model, n, seed):
            f = workdir / "damaged.gguf"
            f.write_bytes(c.data)
            outcomes[c.name] = worker.load(f)
    finally:
        worker.close()
    counts = Counter(o.split(":")[0] for o in outcomes.values())
    return {"n": n, "seed": seed, "counts": dict(counts), "outcomes": outcomes}
