"""Batch-1 decode bandwidth: where the time of one token goes, and what closes the gap to the copy bandwidth.

    python benchmarks/gpu_decode_bw.py --out DIR [--spec conf/model/llama3.1-8b.yaml] [--max-s 540]

Llama-3.1-8B shape, random bf16 weights, one 128-token prompt, greedy, 256 generated tokens (the
setting of ``benchmarks/gpu_decode.py``, whose ``run_decode`` / ``bench_copy`` / byte convention are
reused: bytes read per step = every weight incl. the LM head + the K/V of the whole ``--max-len``
buffer; copy bandwidth counts read + write). Sections, in order, each skipped when ``--max-s`` would
be exceeded:

1. ``copy``: device-to-device copy bandwidth of ``--copy-mib``.
2. ``gemv_floor`` / ``gemv_floor_fused``: only the matrix-vector products of one token (every
   projection of every layer and the LM head, in order, on the model's own weights, batch 1), captured
   in one CUDA graph and replayed: the time a decode step cannot go below with these GEMM kernels, as
   bandwidth and as a fraction of the copy bandwidth. Unfused: q, k, v, o, gate, up, down per layer;
   fused (``wicore.model.fuse``): qkv, o, gate_up, down.
3. ``decode_*``: the real decode step (``GraphedDecoder``): ``graph`` (our CUDA graph, eager kernels),
   ``graph_fused`` (the same with fused projections), ``compile_fused`` (``torch.compile``
   reduce-overhead on the fused model: Inductor fuses the elementwise ops), ``compile_fused_cdt`` (the
   same with Inductor's coordinate-descent tuning). ms per token, tokens/s, achieved bandwidth, fraction
   of the copy bandwidth, whether the greedy tokens equal the unfused graph's, and (teacher forcing) how
   often a variant fed the unfused graph's tokens predicts the same next token: free-running greedy
   sequences of random-weight models part at the first near-tie, so this is the numerical check.

``table.md`` adds the split of a token's time: GEMVs (floor) vs everything else (attention, norms,
RoPE, sampling, launch gaps). Exits 0 with a message without CUDA; ``--cpu-smoke`` runs every
section on the CPU with ``conf/model/tiny-gemma3.yaml`` (graphs and compile run eagerly there).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.gpu_decode import BW_CONVENTION, GB, bench_copy, make_spec, median_time, run_decode  # noqa: E402
from benchmarks.harness import Harness, fmt, lookup, markdown_table, match_stats, write_results  # noqa: E402
from benchmarks.harness import free_memory as free  # noqa: E402
from wicore.model.fuse import fuse_projections, unfuse_projections  # noqa: E402
from wicore.model.kv_cache import KVCache  # noqa: E402
from wicore.model.layers import Attention, GatedMLP  # noqa: E402
from wicore.model.transformer import Transformer, build_model, to_torch_dtype  # noqa: E402

H = Harness("gpu_decode_bw")
log = H.log
section = H.section
VARIANTS = (("graph", "graph", False, False), ("graph_fused", "graph", True, False),
            ("compile_fused", "compile", True, False), ("compile_fused_cdt", "compile", True, True))


def gemv_weights(model: Transformer) -> list[torch.Tensor]:
    """The weight matrices one decode token multiplies by, in order (fused groups where fused)."""
    out: list[torch.Tensor] = []
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert isinstance(attn, Attention) and isinstance(mlp, GatedMLP)
        out += [attn.qkv] if attn.qkv is not None else [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        out.append(attn.o_proj.weight)
        out += [mlp.gate_up] if mlp.gate_up is not None else [mlp.gate_proj.weight, mlp.up_proj.weight]
        out.append(mlp.down_proj.weight)
    out.append(model.output_weight)
    return out


def bench_gemv_floor(out: dict[str, Any], model: Transformer, device: torch.device, repeats: int,
                     copy_bw: float | None) -> None:
    """One token's GEMVs alone, captured in one graph (CUDA) or run in a loop (CPU)."""
    weights = gemv_weights(model)
    dtype = weights[0].dtype
    xs = {k: torch.randn(1, k, device=device, dtype=dtype) for k in {w.shape[1] for w in weights}}

    def run() -> None:
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    fn = run
    if device.type == "cuda":
        run()
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        fn = graph.replay
    t, times = median_time(fn, device, repeats, warmup=2)
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    out.update({"matrices": len(weights), "bytes": nbytes, "ms": t * 1e3, "times_s": times,
                "achieved_GBps": nbytes / t / GB})
    if copy_bw:
        out["fraction_of_copy_bw"] = out["achieved_GBps"] / copy_bw
    log(f"GEMV floor ({len(weights)} matrices): {t * 1e3:.3f} ms -> {out['achieved_GBps']:.0f} GB/s")


def logits_agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How close two logit vectors of the same step are: max |diff| over the logits' standard deviation,
    cosine similarity, and the overlap of their top-10 tokens."""
    top_a, top_b = set(a.topk(10).indices.tolist()), set(b.topk(10).indices.tolist())
    return {"max_abs_diff_over_std": float((a - b).abs().max() / b.std()),
            "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)),
            "top10_overlap": len(top_a & top_b) / 10, "same_argmax": bool(a.argmax() == b.argmax())}


def set_fused(model: Transformer, fused: bool, device: torch.device) -> None:
    if fused:
        fuse_projections(model, device)
    else:
        unfuse_projections(model)


TABLE: list[tuple[str, str]] = [
    ("device", "meta.device"),
    ("copy bandwidth, GB/s (read+write)", "copy.bandwidth_GBps"),
    ("GEMV floor, unfused: ms / GB/s / fraction of copy", "gemv_floor"),
    ("GEMV floor, fused qkv + gate_up: ms / GB/s / fraction of copy", "gemv_floor_fused"),
]


def table_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for label, key in TABLE:
        v = lookup(results, key)
        if isinstance(v, dict):
            v = (f"{fmt(v.get('ms'))} ms / {fmt(v.get('achieved_GBps'))} / {fmt(v.get('fraction_of_copy_bw'))}"
                 if "ms" in v else v.get("error", "–"))
        rows.append((label, fmt(v)))
    floor = lookup(results, "gemv_floor_fused.ms")
    for name, *_ in VARIANTS:
        d = results.get(f"decode_{name}")
        if not isinstance(d, dict):
            continue
        if "error" in d:
            rows.append((f"decode {name}", str(d["error"])[:120]))
            continue
        rows.append((f"decode {name}: ms/token, tok/s", f"{fmt(d.get('ms_per_step'))}, {fmt(d.get('decode_tok_s'))}"))
        rows.append((f"decode {name}: GB/s read, fraction of copy",
                     f"{fmt(d.get('achieved_GBps'))}, {fmt(d.get('fraction_of_copy_bw'))}"))
        if isinstance(floor, float) and isinstance(d.get("ms_per_step"), float):
            rows.append((f"decode {name}: ms beyond the fused GEMV floor", fmt(d["ms_per_step"] - floor)))
        if "tokens_vs_graph" in d:
            m = d["tokens_vs_graph"]
            rows.append((f"decode {name}: tokens == graph", f"{m['matching']}/{m['compared']} (prefix {m['prefix']})"))
        if "first_step_logits_vs_graph_fused" in d:
            la = d["first_step_logits_vs_graph_fused"]
            rows.append((f"decode {name}: first-step logits vs graph_fused (max diff/std, cosine, top-10)",
                         f"{fmt(la['max_abs_diff_over_std'])}, {la['cosine']:.6f}, {fmt(la['top10_overlap'], 1)}"))
        if "teacher_forced" in d:
            tf = d["teacher_forced"]
            rows.append((f"decode {name}: fed the graph's tokens, same next token",
                         f"{tf['agree']}/{tf['positions']} ({fmt(100 * tf['fraction'], 1)} %)"))
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_decode_bw")
    ap.add_argument("--spec", default=str(ROOT / "conf" / "model" / "llama3.1-8b.yaml"))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--copy-mib", type=float, default=4096.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-s", type=float, default=540.0, help="skip a section that starts later than this")
    ap.add_argument("--variants", default=",".join(v[0] for v in VARIANTS), help="comma list of decode variants")
    ap.add_argument("--cpu-smoke", action="store_true", help="dev: every section on the CPU, tiny spec")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.spec, args.dtype, args.steps, args.prompt_len, args.max_len = (
            str(ROOT / "conf" / "model" / "tiny-gemma3.yaml"), "fp32", 6, 8, 32)
        args.copy_mib, args.repeats = 8.0, 1
    return args


def main(argv: list[str] | None = None) -> int:
    H.restart()
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_decode_bw: no CUDA device; nothing to benchmark, exiting 0.", flush=True)
        return 0
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    results: dict[str, Any] = {"meta": {
        "torch": torch.__version__, "python": platform.python_version(), "args": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bandwidth_convention": BW_CONVENTION}}
    t_start = time.perf_counter()

    def time_left() -> bool:
        return time.perf_counter() - t_start < args.max_s

    try:
        with section(results, "copy") as out:
            bench_copy(out, device, int(args.copy_mib * (1 << 20)), 10)
        free(device)
        bw = lookup(results, "copy.bandwidth_GBps")
        copy_bw = bw if isinstance(bw, float) else None
        spec = make_spec(args.spec, args.dtype)
        model = build_model(spec, device, args.dtype, seed=args.seed)
        cache = KVCache(spec, 1, args.max_len, device, to_torch_dtype(args.dtype))
        gen = torch.Generator().manual_seed(args.seed + 1)
        prompt = torch.randint(0, spec.vocab_size, (1, args.prompt_len), generator=gen).to(device)
        with torch.inference_mode():
            for fused in (False, True):
                with section(results, "gemv_floor_fused" if fused else "gemv_floor") as out:
                    set_fused(model, fused, device)
                    bench_gemv_floor(out, model, device, 5 if device.type == "cuda" else 1, copy_bw)
        base_tokens: torch.Tensor | None = None
        base_logits: torch.Tensor | None = None
        wanted = {v.strip() for v in args.variants.split(",") if v.strip()}
        for name, mode, fused, cdt in VARIANTS:
            if name not in wanted:
                continue
            with section(results, f"decode_{name}") as out:
                if not time_left():
                    raise RuntimeError(f"skipped: --max-s {args.max_s:.0f} s reached")
                set_fused(model, fused, device)
                if mode == "compile":
                    torch._dynamo.reset()
                    inductor_config.coordinate_descent_tuning = cdt
                t0 = time.perf_counter()
                res, tokens = run_decode(model, cache, spec, prompt, args.steps, args.repeats, mode, copy_bw,
                                         teacher=base_tokens)
                res.pop("_prompt_logits_row0", None)
                first = res.pop("_first_step_logits", None)
                res["wall_s"] = time.perf_counter() - t0
                out.update(res)
                if base_tokens is None:
                    base_tokens = tokens
                    base_logits = None
                if first is not None:
                    if base_logits is None:  # the first variant with a teacher run is the logits reference
                        base_logits = first
                    else:
                        out["first_step_logits_vs_graph_fused"] = logits_agreement(first, base_logits)
                else:
                    out["tokens_vs_graph"] = match_stats(tokens[0].tolist(), base_tokens[0].tolist(), args.steps)
            free(device)
    finally:
        results["meta"]["total_s"] = time.perf_counter() - t_start
        failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
        results["meta"]["failed_sections"] = failed
        text = markdown_table(table_rows(results))
        print(text, flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            write_results(results, args.out, text + f"\nConvention: {BW_CONVENTION}.\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
