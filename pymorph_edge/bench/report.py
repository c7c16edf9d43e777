"""Turn benchmark results into a Markdown report and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HEADLINE_TASKS = {"passkey", "ppl", "fidelity", "memory", "speed"}  # tasks of the one-row-per-policy table


def _by_policy(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["policy"]: r for r in rows}


def headline(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per policy: the figures of every task at the same budget."""
    t = results["tasks"]
    from pymorph_edge.bench.config import policy_label

    names = [policy_label(p) for p in results["config"]["policies"]]
    pk, pp, fi = (_by_policy(t.get(k, [])) for k in ("passkey", "ppl", "fidelity"))
    me, sp = _by_policy(t.get("memory", [])), _by_policy(t.get("speed", []))
    full_ppl = pp.get("full", {}).get("ppl")
    full_speed = sp.get("full", {}).get("decode_tok_s")
    rows = []
    for n in names:
        row: dict[str, Any] = {"policy": n}
        reasons = [
            r.get("unsupported")
            for r in (pk.get(n, {}), pp.get(n, {}), fi.get(n, {}), sp.get(n, {}))
            if r.get("unsupported")
        ]
        if reasons:
            row["unsupported"] = reasons[0]
        if "accuracy" in pk.get(n, {}):
            row["passkey"] = pk[n]["accuracy"]
        if "ppl" in pp.get(n, {}):
            row["ppl"] = pp[n]["ppl"]
            row["ppl_ratio"] = pp[n]["ppl"] / full_ppl if full_ppl else None
        if "top1_agreement" in fi.get(n, {}):
            row["top1"] = fi[n]["top1_agreement"]
            row["kl"] = fi[n]["mean_kl"]
            row["peak_cells"] = fi[n]["stats"]["peak_cells"]
        lengths = [x for x in me.get(n, {}).get("lengths", []) if "kv_bytes" in x]
        if lengths:
            row["kv_mib_at_max_length"] = lengths[-1]["kv_bytes"] / 2**20
            row["max_length"] = lengths[-1]["length"]
        if "decode_tok_s" in sp.get(n, {}):
            row["decode_tok_s"] = sp[n]["decode_tok_s"]
            row["decode_ratio"] = sp[n]["decode_tok_s"] / full_speed if full_speed else None
        rows.append(row)
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _degradation(row: dict[str, Any], budget: int) -> str:
    """Last segment's KL over that of the first segment that starts after `budget` output tokens.

    Degradation over a long answer, as the MorphKV paper reports it at 12K tokens. Segments before the
    cache first fills evict nothing and sit at numerical noise (1e-9), so a ratio against them would only
    measure when eviction began. A policy that never evicted (the full cache, SnapKV) gets n/a."""
    segs = row["segments"]
    if not row.get("stats", {}).get("tokens_evicted"):
        return "n/a"
    first = next((s for s in segs[:-1] if s["start"] >= budget and s["mean_kl"] > 0), None)
    return f"{segs[-1]['mean_kl'] / first['mean_kl']:.2f}" if first is not None else "n/a"


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    out = [
        f"# pymorph-edge bench: {results['model']}",
        "",
        f"`{results['command']}`",
        "",
        f"Machine: {results['machine']}. Budget {cfg['budget']} cells, seed {cfg['seed']}.",
    ]
    if results.get("note"):
        out += ["", results["note"]]
    t = results["tasks"]
    if set(t) & HEADLINE_TASKS:
        out += [
            "",
            "| policy | passkey acc | ppl | ppl / full | top-1 agreement | mean KL (top-256) | peak cells | KV MiB for longest output | decode tok/s | decode / full |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
    for r in headline(results) if set(t) & HEADLINE_TASKS else []:
        if "unsupported" in r and "passkey" not in r:
            out.append(f"| {r['policy']} | unsupported: {r['unsupported']} |  |  |  |  |  |  |  |  |")
            continue
        out.append(
            f"| {r['policy']} | {_fmt(r.get('passkey'), '.0%')} | {_fmt(r.get('ppl'), '.2f')} | {_fmt(r.get('ppl_ratio'), '.3f')} | "
            f"{_fmt(r.get('top1'), '.1%')} | {_fmt(r.get('kl'), '.1e')} | {_fmt(r.get('peak_cells'), 'd')} | "
            f"{_fmt(r.get('kv_mib_at_max_length'), '.2f')} | {_fmt(r.get('decode_tok_s'), '.1f')} | {_fmt(r.get('decode_ratio'), '.2f')} |"
        )
    if "passkey" in t:
        out += ["", "## Passkey accuracy by prompt length (multiples of the budget)", ""]
        mults = cfg["passkey_multipliers"]
        out += [
            "| policy | KV MiB | flash attn | " + " | ".join(f"{m}x" for m in mults) + " |",
            "| --- | --- | --- |" + " --- |" * len(mults),
        ]
        for r in t["passkey"]:
            if "trials" not in r:
                continue
            kv = f"{r['kv_bytes'] / 2**20:.2f}" if "kv_bytes" in r else "n/a"
            fa = {True: "on", False: "off"}.get(r.get("flash_attn"), "n/a")
            accs = [
                sum(x["correct"] for x in r["trials"] if x["multiplier"] == m)
                / max(1, sum(1 for x in r["trials"] if x["multiplier"] == m))
                for m in mults
            ]
            out.append(f"| {r['policy']} | {kv} | {fa} | " + " | ".join(f"{a:.0%}" for a in accs) + " |")
    if "fidelity" in t:
        out += ["", "## Fidelity to the full cache by output segment (top-1 agreement / mean KL)", ""]
        rows = [r for r in t["fidelity"] if "segments" in r]
        if rows:
            segs = rows[0]["segments"]
            out += [
                "| policy | "
                + " | ".join(f"{s['start']}-{s['end']}" for s in segs)
                + " | KL last / first after the budget |",
                "| --- |" + " --- |" * (len(segs) + 1),
            ]
            for r in rows:
                cells = " | ".join(f"{s['top1_agreement']:.0%} / {s['mean_kl']:.0e}" for s in r["segments"])
                out.append(f"| {r['policy']} | {cells} | {_degradation(r, results['config']['budget'])} |")
    if "memory" in t:
        out += ["", "## KV memory needed to reach an output length (MiB allocated; peak RSS MiB)", ""]
        lens = cfg["memory_lengths"]
        out += ["| policy | " + " | ".join(str(x) for x in lens) + " |", "| --- |" + " --- |" * len(lens)]
        for r in t["memory"]:
            cells = [
                f"{x['kv_bytes'] / 2**20:.2f}; {x['peak_rss_mb']:.0f}" if "kv_bytes" in x else "n/a"
                for x in r.get("lengths", [])
            ]
            out.append(f"| {r['policy']} | " + " | ".join(cells) + " |")
    if "speed" in t:
        out += [
            "",
            "## Speed (prompt of `budget` tokens, then decode)",
            "",
            "| policy | prefill tok/s | decode tok/s | syncs per chunk; per step | device->host bytes per chunk; per step |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in t["speed"]:
            if "decode_tok_s" in r:
                # the scorer's asks and copies (none copied with host buffers); older results lack them
                syncs = (
                    f"{r['syncs_per_prompt_chunk']:.0f}; {r['syncs_per_decode_step']:.0f}"
                    if "syncs_per_decode_step" in r
                    else "n/a"
                )
                d2h = (
                    f"{r['d2h_bytes_per_prompt_chunk']:.0f}; {r['d2h_bytes_per_decode_step']:.0f}"
                    if "d2h_bytes_per_decode_step" in r
                    else "n/a"
                )
                out.append(f"| {r['policy']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {syncs} | {d2h} |")
    if "longrun" in t:
        out += _longrun_table(t["longrun"])
    unsupported = sorted(
        {f"{r['policy']}: {r['unsupported']}" for rows in t.values() for r in rows if "unsupported" in r}
    )
    if unsupported:
        out += ["", "Not run:", ""] + [f"- {u}" for u in unsupported]
    return "\n".join(out) + "\n"


def _longrun_table(rows: list[dict[str, Any]]) -> list[str]:
    """ppl per segment, and each segment's ratio to context_shift's (the reference that never over-spans)."""
    rows = [r for r in rows if "segments" in r]
    if not rows:
        return []
    segs = rows[0]["segments"]
    ref = next((r for r in rows if r["policy"] == "context_shift"), None)
    out = [
        "",
        f"## Long run: teacher-forced ppl per segment (n_ctx_train {rows[0]['n_ctx_train']})",
        "",
        "| policy | max position | compactions | "
        + " | ".join(f"{s['end'] // 1000}K" for s in segs)
        + " | worst / context_shift |",
        "| --- | --- | --- |" + " --- |" * len(segs) + " --- |",
    ]
    for r in rows:
        worst = max(s["ppl"] / q["ppl"] for s, q in zip(r["segments"], ref["segments"], strict=True)) if ref else None
        out.append(
            f"| {r['policy']} | {r['max_next_pos']} | {r['compactions']} | "
            + " | ".join(f"{s['ppl']:.1f}" for s in r["segments"])
            + f" | {_fmt(worst, '.3f')} |"
        )
    return out


def _longrun_plot(rows: list[dict[str, Any]], out_dir: Path, plt: Any) -> Path | None:
    rows = [r for r in rows if "segments" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot([s["end"] for s in r["segments"]], [s["ppl"] for s in r["segments"]], marker=".", label=r["policy"])
    ax.axvline(rows[0]["n_ctx_train"], color="grey", linestyle="--", label="n_ctx_train")
    ax.set(
        xlabel="tokens",
        ylabel="ppl of the segment",
        yscale="log",
        title="Teacher-forced ppl far past the trained context",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "longrun.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(results: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, cfg, made = results["tasks"], results["config"], []
    if "longrun" in t:
        longrun = _longrun_plot(t["longrun"], out_dir, plt)
        made += [longrun] if longrun else []
    if not set(t) & {"passkey", "fidelity", "memory"}:
        return made
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if "passkey" in t:
        mults = cfg["passkey_multipliers"]
        for r in t["passkey"]:
            if "trials" in r:
                accs = [
                    sum(x["correct"] for x in r["trials"] if x["multiplier"] == m)
                    / max(1, sum(1 for x in r["trials"] if x["multiplier"] == m))
                    for m in mults
                ]
                axes[0].plot(mults, accs, marker="o", label=r["policy"])
        axes[0].set(
            xlabel="prompt length / budget",
            ylabel="passkey accuracy",
            title=f"Passkey (budget {cfg['budget']})",
            ylim=(-0.05, 1.05),
        )
    if "fidelity" in t:
        for r in t["fidelity"]:
            if "segments" in r:
                if r["policy"] != "full":  # the reference's own KL is ~0 and has no place on a log scale
                    axes[1].plot(
                        [s["end"] for s in r["segments"]],
                        [max(s["mean_kl"], 1e-9) for s in r["segments"]],
                        marker=".",
                        label=f"{r['policy']} (top-1 {r['top1_agreement']:.0%})",
                    )
        axes[1].set(
            xlabel="output tokens",
            ylabel="mean KL from the full cache (top-256)",
            title="Degradation over length",
            yscale="log",
        )
    if "memory" in t:
        for r in t["memory"]:
            xs = [x["length"] for x in r.get("lengths", []) if "kv_bytes" in x]
            axes[2].plot(
                xs, [x["kv_bytes"] / 2**20 for x in r["lengths"] if "kv_bytes" in x], marker="o", label=r["policy"]
            )
        axes[2].set(xlabel="output length (tokens)", ylabel="KV MiB allocated", title="KV memory", xscale="log")
    for a in axes:
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "bench.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    made.append(path)
    return made


if __name__ == "__main__":  # regenerate results.md and bench.png from a results.json
    import json
    import sys

    src = Path(sys.argv[1])
    res = json.loads(src.read_text())
    (src.parent / "results.md").write_text(markdown(res))
    plots(res, src.parent)
