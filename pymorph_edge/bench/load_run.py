"""A load run against `pymorph-edge serve`: K concurrent openai clients for a while, mixing chat, streaming
chat and completions, some abandoning their stream midway, some continuing their own conversation.
Records every request's outcome and latency and the server's RSS over time."""

from __future__ import annotations

import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai

BAN_EOS_NOTE = "answers end at max_tokens or the model's end of turn"


@dataclass
class Outcome:
    client: int
    kind: str  # chat, chat_stream, completion, abandon, continue
    start_s: float
    latency_s: float
    status: int  # HTTP status; 0: the client's own doing (abandoned stream)
    tokens: int
    cached: int
    error: str = ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_server(model: str, kv_budget: int, extra: list[str]) -> tuple[subprocess.Popen[str], int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pymorph_edge.cli", "serve", "-m", model, "--kv-budget", str(kv_budget)]
        + ["--port", str(port), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc, port
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("serve did not start in 180 s")


TOPICS = ["the sea", "a clock", "bread", "rain on a roof", "a small robot", "mountains", "a library at night"]


def _client(idx: int, port: int, t_end: float, t0: float, max_tokens: int, seed: int, out: list[Outcome]) -> None:
    rng = random.Random(seed * 1000 + idx)
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
    convo: list[dict[str, str]] = []
    while time.time() < t_end:
        kind = rng.choice(["chat", "chat_stream", "completion", "abandon", "continue"])
        topic = rng.choice(TOPICS)
        t = time.time()
        status, tokens, cached, err = 200, 0, 0, ""
        try:
            if kind == "completion":
                r = c.completions.create(
                    model="x", prompt=f"A short note about {topic}:", max_tokens=max_tokens, temperature=0.8
                )
                tokens, cached = r.usage.completion_tokens, r.usage.prompt_tokens_details.cached_tokens
            elif kind in ("chat_stream", "abandon"):
                stream = c.chat.completions.create(
                    model="x",
                    messages=[{"role": "user", "content": f"Tell me about {topic}."}],
                    max_tokens=max_tokens,
                    stream=True,
                )
                for i, _chunk in enumerate(stream):
                    tokens += 1
                    if kind == "abandon" and i >= 3:
                        status = 0
                        break
                stream.close()
            else:
                if kind == "chat" or not convo or len(convo) > 12:
                    convo = [{"role": "user", "content": f"Let us talk about {topic}."}]
                else:
                    convo.append({"role": "user", "content": "Go on."})
                r = c.chat.completions.create(model="x", messages=convo, max_tokens=max_tokens, temperature=0.7)
                convo.append({"role": "assistant", "content": r.choices[0].message.content or ""})
                tokens, cached = r.usage.completion_tokens, r.usage.prompt_tokens_details.cached_tokens
        except openai.APIStatusError as e:
            status, err = e.status_code, str(e)[:200]
            if kind == "continue":
                convo = []
        except openai.APIConnectionError as e:
            status, err = -1, str(e)[:200]
        out.append(Outcome(idx, kind, t - t0, time.time() - t, status, tokens, cached, err))


def run_load(
    model: str,
    clients: int,
    seconds: float,
    kv_budget: int = 512,
    max_tokens: int = 48,
    seed: int = 0,
    server_args: list[str] | None = None,
) -> dict[str, Any]:
    """Run the load; returns a JSON-ready record with every request and the RSS samples."""
    proc, port = start_server(model, kv_budget, server_args or [])
    rss: list[tuple[float, float]] = []
    outcomes: list[Outcome] = []
    try:
        t0 = time.time()
        rss.append((0.0, rss_mib(proc.pid)))
        t_end = t0 + seconds
        threads = [
            threading.Thread(target=_client, args=(i, port, t_end, t0, max_tokens, seed, outcomes), daemon=True)
            for i in range(clients)
        ]
        for th in threads:
            th.start()
        while any(th.is_alive() for th in threads):
            time.sleep(1.0)
            rss.append((time.time() - t0, rss_mib(proc.pid)))
        wall = time.time() - t0
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())
        alive = proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {
        "model": model,
        "clients": clients,
        "seconds": seconds,
        "kv_budget": kv_budget,
        "max_tokens": max_tokens,
        "wall_s": wall,
        "server_alive_at_end": alive,
        "health_at_end": health,
        "rss_mib": rss,
        "requests": [asdict(o) for o in outcomes],
        "summary": summarize(outcomes, wall, rss),
    }


def summarize(outcomes: list[Outcome], wall: float, rss: list[tuple[float, float]]) -> dict[str, Any]:
    done = [o for o in outcomes if o.status == 200]
    lat = sorted(o.latency_s for o in done)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

    # RSS "end" is the mean of the last 10% of samples against the first 10% after the first request
    n = max(1, len(rss) // 10)
    return {
        "requests": len(outcomes),
        "ok": len(done),
        "abandoned": sum(o.status == 0 for o in outcomes),
        "status_429": sum(o.status == 429 for o in outcomes),
        "status_4xx_other": sum(400 <= o.status < 500 and o.status != 429 for o in outcomes),
        "status_5xx": sum(o.status >= 500 for o in outcomes),
        "connection_errors": sum(o.status == -1 for o in outcomes),
        "p50_latency_s": pct(0.5),
        "p95_latency_s": pct(0.95),
        "tokens_per_s": sum(o.tokens for o in done) / wall if wall > 0 else 0.0,
        "mean_latency_s": statistics.fmean(lat) if lat else float("nan"),
        "rss_start_mib": statistics.fmean(r for _, r in rss[1 : 1 + n]) if len(rss) > 1 else rss[0][1],
        "rss_end_mib": statistics.fmean(r for _, r in rss[-n:]),
        "by_kind": {k: sum(1 for o in done if o.kind == k) for k in ("chat", "chat_stream", "completion", "continue")},
        "continued_with_cache": sum(1 for o in done if o.kind == "continue" and o.cached > 0),
    }


def write_report(result: dict[str, Any], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    s = result["summary"]
    lines = [
        f"# Load run: {Path(result['model']).name}, {result['clients']} clients, {result['seconds']:.0f} s, "
        f"kv_budget {result['kv_budget']}, max_tokens {result['max_tokens']}",
        "",
        f"Command: `{command}`",
        "",
        "| requests | ok | abandoned | 429 | other 4xx | 5xx | conn. errors | p50 s | p95 s | tok/s | RSS start MiB | RSS end MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['requests']} | {s['ok']} | {s['abandoned']} | {s['status_429']} | {s['status_4xx_other']} | "
        f"{s['status_5xx']} | {s['connection_errors']} | {s['p50_latency_s']:.2f} | {s['p95_latency_s']:.2f} | "
        f"{s['tokens_per_s']:.1f} | {s['rss_start_mib']:.1f} | {s['rss_end_mib']:.1f} |",
        "",
        f"Completed by kind: {s['by_kind']}; conversation turns continued on a kept state: "
        f"{s['continued_with_cache']}. Server alive at the end: {result['server_alive_at_end']}.",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    reqs = [r for r in result["requests"] if r["status"] == 200]
    for kind in sorted({r["kind"] for r in reqs}):
        pts = [(r["start_s"], r["latency_s"]) for r in reqs if r["kind"] == kind]
        a.scatter([p[0] for p in pts], [p[1] for p in pts], s=8, label=kind)
    a.set_xlabel("request start (s)")
    a.set_ylabel("latency (s)")
    a.legend(fontsize=7)
    a.set_title("latency")
    b.plot([t for t, _ in result["rss_mib"]], [r for _, r in result["rss_mib"]])
    b.set_xlabel("time (s)")
    b.set_ylabel("server RSS (MiB)")
    b.set_title("server memory")
    fig.tight_layout()
    fig.savefig(out / "load.png", dpi=110)
