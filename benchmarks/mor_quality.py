"""MoR routing quality of a trained checkpoint: how much next-token quality each scorer keeps for
the layer compute it saves.

    python benchmarks/mor_quality.py --checkpoint DIR [--out benchmarks/results/mor_quality]
        [--device cuda] [--max-seqs 128] [--quick]

Data: the checkpoint's held-out files (``training_log.json`` names them; else the stdlib hash
split of ``experiments/stdlib_corpus.py``), tokenized with the checkpoint's ``tokenizer.json``,
cut into consecutive windows of the model's context length (teacher forcing).

Reference: one full-depth pass: argmax next token and NLL per position, and the routing signals.

Grid: scorer (learned, confidence, entropy, random) x cpu_depth (the router's depths) x gpu_depth
(num_layers and one smaller, ``--gpu-depths``) x threshold (0, 0.1, ..., 1). The token at position
``t`` is deep when its score >= threshold: ``exit_layer = gpu_depth`` if deep else ``cpu_depth``;
positions < ``--prompt-len`` (64; at most half the window) are the prompt, prefilled on the deep path.
Then one forward with ``exit_layer`` (``Transformer.forward`` early exit: skipped layers' K/V come
from the frozen exit state, so later tokens see exactly what sequential decoding would give them).

Teacher-forced approximation: a token's score comes from the PREVIOUS position of the full-depth
reference pass (learned: the router over its final-normed hidden state; confidence: 1 - max
softmax probability; entropy: entropy / ln(vocab); random: seeded uniform), not from the routed
run in which earlier tokens may have exited early. In real decoding the previous step's signals
come from its own (possibly shallow) forward and the text itself diverges after a disagreement;
here the input tokens are always the reference text.

Metrics, over the routed positions ``prompt_len .. T-2`` (each has a next token to predict):
agreement (% argmax equal to full depth), perplexity and its change vs full depth (%), fraction of
tokens deep, layer-compute fraction = sum of exit layers / (tokens * num_layers).

Writes results.csv (every row), results.json (meta + rows), table.md (the cheapest row that keeps
>= 99/95/90% agreement per scorer at gpu_depth = num_layers) and quality_vs_deep_fraction.png.
``--quick``: 4 windows, thresholds 0/0.5/1, gpu_depth = num_layers only (CPU check).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks.harness import Harness, fmt, markdown_table, sync, write_results  # noqa: E402
from experiments import stdlib_corpus  # noqa: E402
from wicore.model.checkpoint import load_checkpoint  # noqa: E402
from wicore.model.router_weights import load_router  # noqa: E402
from wicore.model.transformer import ModelOutput, Transformer  # noqa: E402

SCORERS = ("learned", "confidence", "entropy", "random")
MAX_SCORE = 1.0 - 2.0 ** -24  # scores are clamped to [0, MAX_SCORE]: threshold 1 routes everything shallow
H = Harness("mor_quality")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benchmarks/mor_quality.py", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mor_quality"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-seqs", type=int, default=128, help="held-out windows (context length each)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--thresholds", default=None, help="comma list (default 0,0.1,...,1)")
    ap.add_argument("--gpu-depths", default=None, help="comma list (default L and L - max(1, L // 6))")
    ap.add_argument("--scorers", default=",".join(SCORERS))
    ap.add_argument("--batch", type=int, default=32, help="windows per forward")
    ap.add_argument("--seed", type=int, default=0, help="random scorer seed")
    ap.add_argument("--quick", action="store_true", help="small grid for a CPU check")
    return ap.parse_args(argv)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def heldout_windows(ckpt: Path, length: int, max_seqs: int) -> tuple[Tensor, list[str]]:
    files = stdlib_corpus.heldout_from_log(ckpt) or stdlib_corpus.list_files()
    tok = stdlib_corpus.load_tokenizer_file(ckpt / "tokenizer.json")
    stream = stdlib_corpus.encode_stream(tok, files.texts("heldout"))
    return stdlib_corpus.consecutive_windows(stream, length, max_seqs), list(files.heldout)


@torch.no_grad()
def forward_stats(model: Transformer, windows: Tensor, batch: int, exit_layer: Tensor | None = None,
                  want_hidden: bool = False) -> dict[str, Tensor]:
    """argmax [N, T], NLL of the next token [N, T-1] (fp32), and with ``want_hidden`` the final-normed
    hidden [N, T, H] plus max-prob and normalised entropy [N, T] of every position."""
    parts: dict[str, list[Tensor]] = {}
    log_v = math.log(model.spec.vocab_size)
    for i in range(0, windows.shape[0], batch):
        ids = windows[i:i + batch]
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        ex = None if exit_layer is None else exit_layer[i:i + batch]
        out = model(ids, pos, exit_layer=ex, return_hidden=want_hidden)
        logits = out.logits if isinstance(out, ModelOutput) else out
        rec = {"argmax": logits.argmax(-1),
               "nll": F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")}
        if want_hidden:
            assert isinstance(out, ModelOutput)
            logp = torch.log_softmax(logits, dim=-1)
            rec["hidden"] = out.hidden
            rec["confidence"] = logp.max(-1).values.exp()
            rec["entropy"] = -(logp.exp() * logp).sum(-1) / log_v
        for k, v in rec.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def shift_scores(per_position: Tensor) -> Tensor:
    """Score of token t = signal of position t-1; position 0 gets MAX_SCORE (it is prompt anyway)."""
    out = torch.full_like(per_position, MAX_SCORE)
    out[:, 1:] = per_position[:, :-1]
    return out.clamp(0.0, MAX_SCORE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("mor_quality: --device cuda but no CUDA device; use --device cpu", file=sys.stderr)
        return 2
    ckpt, out_dir = Path(args.checkpoint), Path(args.out)
    H.restart()
    model, spec = load_checkpoint(ckpt, dev)
    model.eval()
    L, T = spec.num_layers, spec.max_context
    scorers = [s for s in args.scorers.split(",") if s]
    unknown = sorted(set(scorers) - set(SCORERS))
    if unknown:
        print(f"mor_quality: --scorers {unknown} unknown; use some of {list(SCORERS)}", file=sys.stderr)
        return 2
    router = load_router(ckpt, spec, dev)
    depths = list(router.depths)
    if args.thresholds:
        thresholds = [float(x) for x in args.thresholds.split(",")]
    else:
        thresholds = [0.0, 0.5, 1.0] if args.quick else [round(0.1 * i, 1) for i in range(11)]
    gpu_depths = [int(x) for x in args.gpu_depths.split(",")] if args.gpu_depths else (
        [L] if args.quick else [L, L - max(1, L // 6)])
    if any(not 1 <= g <= L for g in gpu_depths):
        print(f"mor_quality: --gpu-depths {gpu_depths} must lie in 1..{L}", file=sys.stderr)
        return 2
    max_seqs = 4 if args.quick else args.max_seqs
    prompt = max(1, min(args.prompt_len, T // 2))
    windows, files = heldout_windows(ckpt, T, max_seqs)
    windows = windows.to(dev)
    n = windows.shape[0]
    H.log(f"{ckpt.name}: {L} layers, {n} held-out windows of {T} tokens, prompt {prompt}, device "
          f"{device_name(dev)}")

    t0 = time.perf_counter()
    ref = forward_stats(model, windows, args.batch, want_hidden=True)
    routed = slice(prompt, T - 1)  # positions with a next token to predict
    ref_nll = ref["nll"][:, routed].double().mean()
    ref_ppl = float(ref_nll.exp())
    gen = torch.Generator().manual_seed(args.seed)
    scores: dict[tuple[str, int], Tensor] = {}
    for k in depths:
        scores[("learned", k)] = shift_scores(router.router_scores(ref["hidden"], k)).cpu()
        scores[("confidence", k)] = shift_scores(1.0 - ref["confidence"]).cpu()
        scores[("entropy", k)] = shift_scores(ref["entropy"]).cpu()
        scores[("random", k)] = shift_scores(torch.rand(n, T, generator=gen)) if k == depths[0] \
            else scores[("random", depths[0])]
    del ref["hidden"]
    sync(dev)
    ref_s = time.perf_counter() - t0

    rows: list[dict[str, Any]] = []
    memo: dict[str, dict[str, float]] = {}
    t1 = time.perf_counter()
    forwards = 0
    for scorer in scorers:
        for k in depths:
            for g in gpu_depths:
                if k >= g:
                    continue
                for th in thresholds:
                    deep = scores[(scorer, k)] >= th
                    deep[:, :prompt] = True
                    exit_layer = torch.where(deep, g, k).to(torch.int64)
                    key = hashlib.sha1(exit_layer.numpy().tobytes()).hexdigest()
                    if key not in memo:
                        st = forward_stats(model, windows, args.batch, exit_layer.to(dev))
                        agree = (st["argmax"][:, routed] == ref["argmax"][:, routed]).double().mean()
                        nll = st["nll"][:, routed].double().mean()
                        memo[key] = {"agreement": float(agree), "nll": float(nll)}
                        forwards += 1
                    m = memo[key]
                    ppl = math.exp(m["nll"])
                    rows.append({"scorer": scorer, "cpu_depth": k, "gpu_depth": g, "threshold": th,
                                 "agreement": m["agreement"], "ppl": ppl, "ref_ppl": ref_ppl,
                                 "ppl_change_pct": 100.0 * (ppl / ref_ppl - 1.0),
                                 "deep_fraction": float(deep[:, routed].double().mean()),
                                 "compute_fraction": float(exit_layer[:, routed].double().mean() / L),
                                 "tokens": int(n * (T - 1 - prompt))})
    sync(dev)
    grid_s = time.perf_counter() - t1
    meta = {"checkpoint": str(ckpt), "device": device_name(dev), "torch": torch.__version__,
            "num_layers": L, "context": T, "windows": n, "prompt_len": prompt,
            "routed_tokens_per_config": int(n * (T - 1 - prompt)), "heldout_files": files,
            "ref_ppl": ref_ppl, "depths": depths, "gpu_depths": gpu_depths, "thresholds": thresholds,
            "configs": len(rows), "distinct_forwards": forwards, "reference_s": round(ref_s, 2),
            "grid_s": round(grid_s, 2), "total_s": round(H.elapsed(), 2), "quick": args.quick}
    H.log(f"{len(rows)} configs, {forwards} distinct forwards in {grid_s:.1f} s (reference {ref_s:.1f} s); "
          f"full-depth perplexity {ref_ppl:.3f}")
    write_outputs(out_dir, meta, rows, L)
    H.log(f"wrote {out_dir}")
    return 0


def best_rows(rows: list[dict[str, Any]], num_layers: int) -> list[dict[str, Any]]:
    """Per scorer and agreement target: the cheapest (compute fraction) row at gpu_depth = num_layers."""
    out = []
    for scorer in dict.fromkeys(r["scorer"] for r in rows):
        for target in (0.99, 0.95, 0.90):
            ok = [r for r in rows if r["scorer"] == scorer and r["gpu_depth"] == num_layers
                  and r["agreement"] >= target]
            if ok:
                best = min(ok, key=lambda r: (r["compute_fraction"], -r["agreement"]))
                out.append({"target": target, **best})
    return out


def write_outputs(out_dir: Path, meta: dict[str, Any], rows: list[dict[str, Any]], num_layers: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    best = best_rows(rows, num_layers)
    head = markdown_table([(k, fmt(meta[k])) for k in ("device", "checkpoint", "num_layers", "windows",
                                                         "prompt_len", "routed_tokens_per_config", "ref_ppl",
                                                         "configs", "distinct_forwards", "grid_s", "total_s")])
    lines = ["", f"Cheapest configuration keeping each agreement target (gpu_depth = {num_layers}):", "",
             "| scorer | target | cpu_depth | threshold | agreement % | ppl change % | deep % | compute % |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['scorer']} | {r['target']:.0%} | {r['cpu_depth']} | {r['threshold']:g} | "
              f"{100 * r['agreement']:.2f} | {r['ppl_change_pct']:+.2f} | {100 * r['deep_fraction']:.1f} | "
              f"{100 * r['compute_fraction']:.1f} |" for r in best]
    write_results({"meta": meta, "best": best, "rows": rows}, out_dir, head + "\n".join(lines) + "\n")
    plot(out_dir / "quality_vs_deep_fraction.png", rows, num_layers, meta["device"])


def plot(path: Path, rows: list[dict[str, Any]], num_layers: int, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["cpu_depth"] for r in rows})
    fig, axes = plt.subplots(2, len(depths), figsize=(4 * len(depths), 7), squeeze=False, sharex=True)
    for j, k in enumerate(depths):
        for scorer in dict.fromkeys(r["scorer"] for r in rows):
            pts = sorted((r for r in rows if r["scorer"] == scorer and r["cpu_depth"] == k
                          and r["gpu_depth"] == num_layers), key=lambda r: r["deep_fraction"])
            if not pts:
                continue
            x = [100 * r["deep_fraction"] for r in pts]
            axes[0][j].plot(x, [100 * r["agreement"] for r in pts], marker="o", ms=3, label=scorer)
            axes[1][j].plot(x, [r["ppl_change_pct"] for r in pts], marker="o", ms=3, label=scorer)
        axes[0][j].set_title(f"cpu_depth {k} / gpu_depth {num_layers}")
        axes[1][j].set_xlabel("tokens on the deep path (%)")
    axes[0][0].set_ylabel("next-token agreement with full depth (%)")
    axes[1][0].set_ylabel("perplexity change vs full depth (%)")
    axes[0][0].legend()
    fig.suptitle(f"MoR routing quality, teacher-forced held-out windows ({device})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
