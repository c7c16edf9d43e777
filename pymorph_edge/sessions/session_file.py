"""A conversation on disk: the file format of Llama.save_session / load_session.

    b"PMESESS\\n"  u64 header length  header (JSON)  llama.cpp sequence state  scorer state  blake2b-32 of all before

The header names what the state only fits: the model (file size, a hash of its first MiB, architecture,
layer count, vocabulary), the policy with every setting, the budget and the cache's cell count. The
checksum catches a truncated or damaged file before anything is touched. Writes go to a temporary file
in the same folder and are renamed over the target, so a crash mid-save leaves the old file whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pymorph_edge.engine.engine_snapshot import EngineSnapshot
from pymorph_edge.generation.chat import ChatTurn

MAGIC = b"PMESESS\n"
FORMAT = 1
_DIGEST = 32
_HEAD_BYTES = 1 << 20  # hashed part of the model file: its GGUF header, metadata and first tensors


@dataclass
class SavedConversation:
    """Everything a conversation needs to go on: the engine's sequence and the chat turn it holds."""

    identity: dict[str, Any]  # model_identity() and policy_identity(), budget and cells
    snapshot: EngineSnapshot
    turn: ChatTurn | None

    @property
    def nbytes(self) -> int:
        return self.snapshot.nbytes


def model_identity(model_path: Path, arch: str, n_layer: int, n_vocab: int) -> dict[str, Any]:
    with open(model_path, "rb") as f:
        head = hashlib.blake2b(f.read(_HEAD_BYTES), digest_size=16).hexdigest()
    return {
        "file": model_path.name,
        "size": model_path.stat().st_size,
        "head_blake2b": head,
        "arch": arch,
        "n_layer": n_layer,
        "n_vocab": n_vocab,
    }


def policy_identity(policy: Any) -> dict[str, Any]:
    fields = dataclasses.asdict(policy) if dataclasses.is_dataclass(policy) else {}
    return {"name": policy.name, **fields}


def mismatch(saved: dict[str, Any], running: dict[str, Any]) -> str | None:
    """The first setting that differs, said plainly; None when the state fits."""
    if saved.get("model") != running["model"]:
        s, r = saved.get("model") or {}, running["model"]
        return f"it was saved with model {s.get('file')!r} ({s.get('size')} bytes), this is {r['file']!r} ({r['size']} bytes)"
    for key in ("policy", "kv_budget", "n_ctx", "n_ubatch", "kv_cache"):
        was = saved.get(key, KV_CACHE_BEFORE_TYPES if key == "kv_cache" else None)
        if key == "policy" and isinstance(was, dict):
            was = {**POLICY_FIELDS_BEFORE.get(was.get("name"), {}), **was}
        if was != running[key]:
            return f"it was saved with {key}={was!r}, this model runs {key}={running[key]!r}"
    return None


# policy settings added after files were written, with the value those older files behaved as: H2O summed
# plainly before its scores could fade; MorphKV pooled at every decode step before pooling was limited to prompts
POLICY_FIELDS_BEFORE: dict[str, dict[str, Any]] = {"h2o": {"forget": 1.0}, "morphkv": {"pool_decode": True}}

# files written before cache types could be chosen: f16 K and V, flash attention off (V stored transposed)
KV_CACHE_BEFORE_TYPES = {"type_k": "f16", "type_v": "f16", "flash_attn": False}


def write(path: str | Path, conv: SavedConversation) -> int:
    """Write atomically; returns the file's size in bytes."""
    path = Path(path)
    snap = conv.snapshot
    header = {
        "format": FORMAT,
        **conv.identity,
        "counters": snap.counters,
        "history": snap.history,
        "recall": snap.recall,
        "turn": conv.turn.to_json() if conv.turn is not None else None,
        "llama_bytes": len(snap.llama_state),
        "scorer_bytes": -1 if snap.scorer_state is None else len(snap.scorer_state),
    }
    head = json.dumps(header).encode()
    body = MAGIC + struct.pack("<Q", len(head)) + head + snap.llama_state + (snap.scorer_state or b"")
    data = body + hashlib.blake2b(body, digest_size=_DIGEST).digest()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(data)


def read(path: str | Path) -> SavedConversation:
    """Read and check a session file; FileNotFoundError, or ValueError naming what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"session file {str(path)!r} does not exist")
    data = path.read_bytes()
    where = f"session file {str(path)!r}"
    if not data.startswith(MAGIC):
        raise ValueError(f"{where} is not a pymorph_edge session (bad magic)")
    if len(data) < len(MAGIC) + 8 + _DIGEST:
        raise ValueError(f"{where} is truncated ({len(data)} bytes)")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.blake2b(body, digest_size=_DIGEST).digest() != digest:
        raise ValueError(f"{where} is damaged or truncated (checksum mismatch)")
    (n_head,) = struct.unpack_from("<Q", body, len(MAGIC))
    start = len(MAGIC) + 8
    try:
        header = json.loads(body[start : start + n_head])
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, this version reads {FORMAT}")
        n_llama, n_scorer = int(header["llama_bytes"]), int(header["scorer_bytes"])
        blobs = body[start + n_head :]
        if n_llama < 0 or len(blobs) != n_llama + max(n_scorer, 0):
            raise ValueError(f"{len(blobs)} bytes of state, the header says {n_llama} + {max(n_scorer, 0)}")
        snapshot = EngineSnapshot(
            counters={k: int(v) for k, v in header["counters"].items()},
            history=header["history"],
            llama_state=blobs[:n_llama],
            scorer_state=None if n_scorer < 0 else blobs[n_llama:],
            recall=header.get("recall"),
        )
        turn = ChatTurn.from_json(header["turn"]) if header["turn"] is not None else None
        identity = {k: header[k] for k in ("model", "policy", "kv_budget", "n_ctx", "n_ubatch")}
        identity["kv_cache"] = header.get("kv_cache", KV_CACHE_BEFORE_TYPES)
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where} has a malformed header: {exc!r}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return SavedConversation(identity, snapshot, turn)
