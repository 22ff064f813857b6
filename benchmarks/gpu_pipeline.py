"""2-GPU pipeline-parallel benchmark: decode throughput of the real runtime with pp=2 vs one GPU (issue 4).

    python benchmarks/gpu_pipeline.py [--out DIR] [--tokens 6] [--batches 1,4,16]
    python benchmarks/gpu_pipeline.py --smoke --out DIR      # CPU, tiny model, gloo (the tests)

Random weights (``benchmarks.gpu_offload.make_fill``: one seeded generator per parameter name, so one GPU
and both pipeline stages hold the same values), bf16, greedy. Every measurement goes through the engine's
step interface: ``backend.execute(StepPlan)`` with one decode item per request (prompts of one token, so
every step is a batched decode at a short context), ``--warmup`` untimed steps, then ``--tokens`` timed
steps; each step returns once its tokens are on rank 0's host.

1. copy: pinned / pageable host -> device copy bandwidth of each GPU (``gpu_offload.bench_copy``).
2. large_pp1 / large_pp2: Gemma-3-27B shape with a ``--large-budget-gib`` (16) GiB budget per GPU;
   ``StaticPlacement`` (tp=1, pp=1 or 2) picks the streamed layers of each GPU, streamed from pinned host
   memory (``wicore.runtime.offload``). pp1: ``StreamingTorchBackend`` on GPU 0; pp2: ``PipelineBackend``
   (``wicore.runtime.pipeline``) on GPUs 0 and 1, NCCL between the stages. Per batch: decode tokens/s,
   ms per step, and per GPU: bytes streamed per step and per token, achieved PCIe GB/s (bytes / copy time
   from CUDA events), copy busy fraction; tokens pp2 vs pp1.
3. small_pp1 / small_pp2: Gemma-3-1B shape, everything resident: the pipeline's own cost per step.

Writes ``results.json``, ``table.md`` and ``log.txt`` to ``--out``; exits 0 with a message when fewer
than 2 CUDA devices are visible, 1 when a section failed (its error is in results.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.gpu_offload import bench_copy, budget_for, make_fill  # noqa: E402
from benchmarks.harness import Harness, fmt, lookup, markdown_table, match_stats, write_results  # noqa: E402
from benchmarks.harness import free_memory as free  # noqa: E402
from wicore.devices import probe  # noqa: E402
from wicore.hal import GIB  # noqa: E402
from wicore.memory.placement import MemoryConfig, StaticPlacement  # noqa: E402
from wicore.model.checkpoint import load_spec_file  # noqa: E402
from wicore.model.kv_cache import KVCache  # noqa: E402
from wicore.model.spec import ModelSpec  # noqa: E402
from wicore.model.transformer import Transformer, to_torch_dtype  # noqa: E402
from wicore.runtime import pipeline  # noqa: E402
from wicore.runtime.backend import TorchBackend  # noqa: E402
from wicore.runtime.offload import StreamingTorchBackend, offload_model  # noqa: E402
from wicore.types import BatchItem, Phase, Request, StepPlan  # noqa: E402

GB = 1e9
FILL = "benchmarks.gpu_offload:make_fill"
NO_GPU = "gpu_pipeline: needs 2 CUDA devices (torch sees {n}); nothing to benchmark, exiting 0."


class LoggingHarness(Harness):
    """The shared harness, keeping every log line for log.txt."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.lines: list[str] = []

    def restart(self) -> None:
        super().restart()
        self.lines.clear()

    def log(self, msg: str) -> None:
        line = f"[{self.name} {self.elapsed():7.1f}s] {msg}"
        self.lines.append(line)
        print(line, flush=True)


H = LoggingHarness("gpu_pipeline")
log = H.log


# ----- pure helpers -----------------------------------------------------------------------------------
def placement(spec: ModelSpec, budget_gib: float, pp: int, mem: MemoryConfig) -> StaticPlacement:
    """The placement of ``spec`` over ``pp`` GPUs of this machine, each with ``budget_gib`` of memory."""
    hw = probe(measure=False)
    hw = replace(hw, gpu=replace(hw.gpu, memory_gib=budget_gib))
    return StaticPlacement(spec, hw, list(range(pp)), 1, pp, mem)


def streamed_per_gpu(p: StaticPlacement) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(layer for layer, _ in g.streamed) for g in p.placements)


def decode_plans(base_rid: int, batch: int, steps: int) -> list[StepPlan]:
    """``steps`` plans decoding ``batch`` requests (one-token prompts) from position 0."""
    return [StepPlan(s + 1, 0, 0.0, [BatchItem(base_rid + i, Phase.DECODE, 1, s, True) for i in range(batch)])
            for s in range(steps)]


ROWS: list[tuple[str, str]] = [("device", "meta.device"), ("large model, budget per GPU", "meta.large"),
                               ("small model (resident)", "meta.small")]


def table_rows(batches: list[int]) -> list[tuple[str, str]]:
    rows = list(ROWS)
    for g in (0, 1):
        rows.append((f"GPU {g} pinned H2D copy GB/s", f"copy.gpu{g}.pinned_GBps"))
    for size in ("large", "small"):
        for pp in (1, 2):
            sec = f"{size}_pp{pp}"
            rows.append((f"{size} pp{pp}: layers streamed per GPU", f"{sec}.streamed"))
            for b in batches:
                rows.append((f"{size} pp{pp} batch {b}: decode tokens/s", f"{sec}.batches.{b}.decode_tok_s"))
                rows.append((f"{size} pp{pp} batch {b}: ms per step", f"{sec}.batches.{b}.ms_per_step"))
                if size == "large":
                    for g in range(pp):
                        rows += [(f"{size} pp{pp} batch {b} GPU {g}: GB streamed per token",
                                  f"{sec}.batches.{b}.gpu{g}.GB_per_token"),
                                 (f"{size} pp{pp} batch {b} GPU {g}: achieved PCIe GB/s",
                                  f"{sec}.batches.{b}.gpu{g}.achieved_GBps"),
                                 (f"{size} pp{pp} batch {b} GPU {g}: copy busy fraction",
                                  f"{sec}.batches.{b}.gpu{g}.copy_busy_fraction")]
            if pp == 2:
                rows += [(f"{size} pp2 / pp1 tokens/s, batch {b}", f"{sec}.batches.{b}.speedup_vs_pp1")
                         for b in batches]
                rows.append((f"{size} pp2 greedy tokens vs pp1", f"{sec}.tokens_vs_pp1"))
            rows.append((f"{size} pp{pp}: peak GPU memory GiB per GPU", f"{sec}.peak_gpu_GiB"))
    rows.append(("total runtime (s)", "meta.total_s"))
    return rows


def markdown(results: dict[str, Any], batches: list[int]) -> str:
    rows = [(k, fmt(v)) for k, p in table_rows(batches) if (v := lookup(results, p)) is not None]
    return markdown_table(rows)


# ----- measurement ------------------------------------------------------------------------------------
def gpu_counters(backend: Any) -> list[dict[str, Any]]:
    """Streaming counters per GPU since the last reset (synchronised)."""
    if isinstance(backend, pipeline.PipelineBackend):
        return [s.get("stream") or {} for s in backend.stage_stats()]
    st = getattr(backend, "streamer", None)
    return [st.stats(sync=True) if st is not None else {}]


def reset(backend: Any) -> None:
    if isinstance(backend, pipeline.PipelineBackend):
        backend.reset_counters()
        return
    st = getattr(backend, "streamer", None)
    if st is not None:
        st.synchronize()
        st.reset_counters()
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)
        torch.cuda.reset_peak_memory_stats(backend.device)


def measure(out: dict[str, Any], backend: Any, batches: list[int], steps: int, warmup: int) -> None:
    """Decode ``steps`` timed steps (after ``warmup``) at each batch size; tokens by request id."""
    out["batches"], out["tokens"] = {}, {}
    for b in batches:
        base = 10_000 * b
        for i in range(b):
            backend.add_request(Request(base + i, 0.0, 1, warmup + steps))
        plans = decode_plans(base, b, warmup + steps)
        for plan in plans[:warmup]:
            backend.execute(plan)
        reset(backend)
        t0 = time.perf_counter()
        for plan in plans[warmup:]:
            backend.execute(plan)
        wall = time.perf_counter() - t0
        row: dict[str, Any] = {"decode_tok_s": b * steps / wall, "ms_per_step": wall / steps * 1e3, "steps": steps}
        for g, c in enumerate(gpu_counters(backend)):
            if c.get("forwards"):
                per_step = c["forwards"] * c["bytes_per_forward"] / steps  # (copies issued also hold a prefetch)
                row[f"gpu{g}"] = {"bytes_per_step": per_step, "GB_per_token": per_step / b / GB,
                                  "achieved_GBps": c["achieved_GBps"], "copy_s": c["copy_s"],
                                  "copy_busy_fraction": c["copy_s"] / wall}
        out["batches"][str(b)] = row
        for i in range(b):
            out["tokens"][str(base + i)] = list(backend.tokens[base + i][1:])
            backend.release(base + i)
        gpus = ", ".join(f"GPU{g} {row[f'gpu{g}']['GB_per_token']:.2f} GB/token at "
                         f"{row[f'gpu{g}']['achieved_GBps']:.1f} GB/s" for g in range(2) if f"gpu{g}" in row)
        log(f"batch {b}: {row['decode_tok_s']:.3f} tok/s ({row['ms_per_step']:.1f} ms/step){'; ' + gpus if gpus else ''}")


def one_gpu(spec: ModelSpec, device: torch.device, streamed: tuple[int, ...], slots: int, max_len: int,
            seed: int, pin: str) -> TorchBackend:
    """The single-GPU runtime on ``device``: StreamingTorchBackend (or TorchBackend when nothing streams)."""
    with torch.device("meta"):
        model = Transformer(spec)
    model = model.to(dtype=to_torch_dtype(spec.dtype))
    st = offload_model(model, streamed, device, "auto", fill=make_fill(spec, device, seed), pin=pin)
    cache = KVCache(spec, slots, max_len, device, to_torch_dtype(spec.dtype))
    if not st.order:
        st.close()
        return TorchBackend(model.eval(), cache, time.perf_counter(), seed=seed)
    return StreamingTorchBackend(model.eval(), cache, time.perf_counter(), streamer=st, seed=seed)


def run_section(out: dict[str, Any], spec: ModelSpec, budget_gib: float | None, pp: int, devices: tuple[str, ...],
                args: argparse.Namespace, mem: MemoryConfig, ref: dict[str, Any] | None) -> None:
    slots, max_len = max(args.batches), args.warmup + args.tokens + 2
    if budget_gib is None:
        streamed: tuple[tuple[int, ...], ...] = ((),) * pp
    else:
        streamed = streamed_per_gpu(placement(spec, budget_gib, pp, mem))
    out.update({"spec": spec.name, "pp": pp, "devices": list(devices), "budget_GiB_per_gpu": budget_gib,
                "streamed": " + ".join(f"{len(s)}/{spec.num_layers // pp if pp > 1 else spec.num_layers}"
                                       for s in streamed)})
    log(f"{spec.name} pp={pp} on {','.join(devices)}: streamed per GPU {out['streamed']}")
    t0 = time.perf_counter()
    if pp == 1:
        backend: Any = one_gpu(spec, torch.device(devices[0]), streamed[0], slots, max_len, args.seed, args.pin)
    else:
        cfg = pipeline.PipelineConfig(spec, devices, slots, max_len, streamed=streamed, seed=args.seed, fill=FILL,
                                      stream_buffers=mem.stream_buffer_layers, pin=args.pin,
                                      threads=torch.get_num_threads())
        backend = pipeline.launch(cfg)
    try:
        out["setup_s"] = time.perf_counter() - t0
        log(f"built in {out['setup_s']:.1f} s")
        measure(out, backend, args.batches, args.tokens, args.warmup)
        if isinstance(backend, pipeline.PipelineBackend):
            stages = backend.stage_stats()
            out["gpus"] = [{"layers": s["layers"], "streamed_layers": (s.get("stream") or {}).get("num_streamed", 0),
                            "peak_gpu_GiB": s.get("peak_gpu_GiB")} for s in stages]
            if all(s.get("peak_gpu_GiB") is not None for s in stages):
                out["peak_gpu_GiB"] = " / ".join(fmt(s["peak_gpu_GiB"]) for s in stages)
        else:
            st = getattr(backend, "streamer", None)
            out["gpus"] = [{"streamed_layers": len(st.order) if st is not None else 0}]
            if backend.device.type == "cuda":
                out["peak_gpu_GiB"] = torch.cuda.max_memory_allocated(backend.device) / GIB
    finally:
        if isinstance(backend, pipeline.PipelineBackend):
            backend.close()
        elif getattr(backend, "streamer", None) is not None:
            backend.streamer.close()
        del backend
        gc.collect()
    if ref and ref.get("tokens"):
        keys = sorted(ref["tokens"], key=int)
        out["tokens_vs_pp1"] = match_stats([t for k in keys for t in out["tokens"].get(k, [])],
                                           [t for k in keys for t in ref["tokens"][k]])
        for b, row in out["batches"].items():
            row["speedup_vs_pp1"] = row["decode_tok_s"] / ref["batches"][b]["decode_tok_s"]


# ----- main -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_pipeline")
    ap.add_argument("--large", default=str(ROOT / "conf" / "model" / "gemma3-27b.yaml"))
    ap.add_argument("--small", default=str(ROOT / "conf" / "model" / "gemma3-1b.yaml"))
    ap.add_argument("--large-budget-gib", type=float, default=16.0, help="GPU memory budget per GPU")
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--tokens", type=int, default=6, help="timed decode steps per batch size (large model)")
    ap.add_argument("--small-tokens", type=int, default=48, help="timed decode steps per batch size (small)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pin", default="auto", choices=["auto", "register", "pin_memory"])
    ap.add_argument("--stream-buffers", type=int, default=2, help="memory.stream_buffer_layers")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, two gloo ranks (tests)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    H.restart()
    args = parse_args(argv)
    n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.smoke and n_gpu < 2:
        print(NO_GPU.format(n=n_gpu), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"status": "skipped", "reason": NO_GPU.format(n=n_gpu)}) + "\n")
        return 0
    if args.smoke:
        tiny = load_spec_file(ROOT / "conf" / "model" / "tiny-gemma3.yaml").with_dtype("bf16")
        large, small = tiny, tiny
        args.stream_buffers, args.tokens, args.small_tokens, args.batches = 1, 3, 3, [1, 3]
        mem = MemoryConfig(stream_buffer_layers=1)
        args.large_budget_gib = budget_for(tiny, 1, mem)  # per GPU: 1 GPU streams 5 of 6, each stage 2 of 3
        devices = ("cpu", "cpu")
    else:
        large, small = load_spec_file(args.large), load_spec_file(args.small)
        mem = MemoryConfig(stream_buffer_layers=args.stream_buffers)
        devices = ("cuda:0", "cuda:1")
    results: dict[str, Any] = {"meta": {
        "torch": torch.__version__, "python": platform.python_version(), "args": vars(args),
        "device": " + ".join(torch.cuda.get_device_name(i) for i in range(2)) if not args.smoke else "cpu + cpu",
        "large": f"{large.name} @ {args.large_budget_gib:.4g} GiB per GPU", "small": f"{small.name}"}}
    meta = results["meta"]
    if not args.smoke:
        meta["cuda"] = torch.version.cuda
        meta["nccl"] = str(torch.cuda.nccl.version())
    log(f"devices {meta['device']}, torch {torch.__version__}")
    small_args = argparse.Namespace(**{**vars(args), "tokens": args.small_tokens})
    failed: list[str] = []
    threads = torch.get_num_threads()
    if args.smoke:
        torch.set_num_threads(1)  # tiny matmuls; the two ranks share the cores
    try:
        with H.section(results, "copy") as out:
            for g in range(2) if not args.smoke else []:
                out[f"gpu{g}"] = {}
                bench_copy(out[f"gpu{g}"], torch.device("cuda", g), 1 << 30)
        jobs = [] if args.skip_large else [("large", large, args.large_budget_gib, args)]
        jobs += [("small", small, None, small_args)]
        for size, spec, budget, a in jobs:
            ref: dict[str, Any] | None = None
            for pp in (1, 2):
                with H.section(results, f"{size}_pp{pp}") as out:
                    run_section(out, spec, budget, pp, devices[:pp], a, mem, ref)
                if pp == 1:
                    ref = out if "error" not in out else None
                free(torch.device(devices[0]))
    finally:
        torch.set_num_threads(threads)
        meta["total_s"] = H.elapsed()
        failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
        meta["failed_sections"] = failed
        text = markdown(results, args.batches)
        print("\n" + text, flush=True)
        write_results(results, args.out, text)
        log(f"wrote {args.out / 'results.json'}, table.md and log.txt")
        (args.out / "log.txt").write_text("\n".join(H.lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
