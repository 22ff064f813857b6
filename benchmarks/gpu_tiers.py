"""GPU benchmark and correctness check of two real-runtime features: KV swapping (``scheduler.preemption=swap``
on ``backend=torch``) and the NVMe weight tier (``memory.offload_to=nvme``).

    python benchmarks/gpu_tiers.py --out DIR [--nvme-dir /local/nvme/dir] [--tokens 6] [--max-s 330]
    python benchmarks/gpu_tiers.py --cpu-smoke --out /tmp/gt       # every code path, tiny shapes, on the CPU

Random weights, greedy decoding. Sections (each one's failure is recorded in results.json; the others run):

A. kv_swap: ``experiments.run_torch.run_torch`` on configs composed with ``wicore.server.cli.compose``:
   model=gemma3-1b (bf16 on the GPU), continuous batching, ``--requests`` closed-loop requests,
   ``--concurrency`` at a time (= scheduler.max_num_seqs = KV slots), fixed prompt ``--prompt`` / output
   ``--output`` tokens. Three runs: ``nopreempt`` (every slot's KV pages: no preemption), ``swap``
   (``backend.kv_pages`` = ``--kv-fraction`` of the pages the concurrent requests need at full length, so
   the scheduler preempts, ``scheduler.preemption=swap``) and ``recompute`` (same pages,
   ``scheduler.preemption=recompute``); the trio again with ``backend.cuda_graphs=true`` unless
   ``--skip-graphs`` (graph decode reading slots that a swap just filled or freed is the risky path).
   Per run: output tokens/s, TPOT p50 (summary.json), preemptions (steps.parquet ``preempted``), swaps and
   bytes per direction, the copy stream's busy time (``backend.describe()`` kv_swap_*, = placement.json;
   per direction from the ``swap_out`` / ``swap_in`` ops the swapper reports into each StepResult:
   CUDA events around the swap-outs and swap-ins on the copy stream, so a swap-out's time includes the
   gather of the slot's layers and the zeroing of the slot), achieved swap GB/s = bytes / copy time,
   and the steps' ``link_bytes`` / ``transfer_s`` sums (where the swap bytes land in steps.parquet).
   Correctness: each request's generated tokens (captured by wrapping ``backend.release``; negative
   ids are warm-up requests) against the same mode's ``nopreempt`` run; and, in the swap runs, a KV
   check (``--no-kv-check`` turns it off): ``backend._move_kv`` is wrapped, each swapped-out slot is
   cloned on the device just before the swap-out and compared bit for bit with the slot it is swapped
   into (one host sync per swap-in; the swap copy times come from CUDA events and are not affected).
   Random bf16 weights have near-tied logits and the decode GEMMs' rounding depends on the batch size,
   which preemption changes: a greedy divergence late in a request is not by itself a swap bug, a
   failed KV check is.
B. nvme_tier: (i) the same engine path (build_torch via run_torch) with ``backend.gpu_budget_gib`` chosen
   so that ``--nvme-resident`` of gemma3-1b's 26 layers stay on the GPU (``gpu_offload.budget_for``),
   int4: host tier (``memory.offload_to=cpu backend.host_format=int4``) vs NVMe tier
   (``memory.offload_to=nvme``, ``backend.nvme_dir`` = a directory under ``--nvme-dir``): identical greedy
   tokens expected (the same int4 weights from RAM or from the drive), output tokens/s, bytes read from
   the drive, drive GB/s (bytes / time inside the reads), the time the host waited for reads, PCIe GB/s
   (the streamer's counters, reset after the warm-up; ``stream_*`` in placement.json).
   (ii) nvme_scale: the Gemma-3-27B shape with a ``--large-budget-gib`` (16) GPU budget, the streamed
   layers picked by ``StaticPlacement`` as in gpu_offload.py; built on the meta device and filled on the
   GPU tensor by tensor (``offload_model(fill=gpu_offload.make_fill(...))``: each streamed layer is
   quantized on the GPU and written to its file, the model is never materialised in host memory), a
   ``--prompt-len`` token prompt, a warm-up and a timed prefill, ``--tokens`` timed batch-1 decode steps
   (counters reset after the prefill). NVMe tier (int4) then, when host memory and the time allow, the
   host tier (int4, pinned blocks) for the ratio. Reported: tokens/s, bytes read from the drive per
   token, drive GB/s, effective drive GB/s (bytes per token x tokens/s), PCIe GB/s, disk-wait seconds.
C. the header of table.md: the card, torch / CUDA versions, the drive directory's filesystem and mount
   source, and whether the reads used O_DIRECT (``disk_io`` of the runs; a probe at start-up otherwise).

Every file written to the drive lives in a fresh ``gpu_tiers_*`` directory under ``--nvme-dir`` (default:
the system temporary directory), removed at the end. Each run's result folder (summary.json, steps.parquet,
placement.json) is kept under ``--out``/runs. ``--max-s``: a section (or run) whose estimated time would end
the script past it is skipped. Writes ``results.json`` and ``table.md`` to ``--out`` (after every section);
exits 0 with a message without CUDA (unless ``--cpu-smoke``), 1 when a section failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.gpu_offload import budget_for, decode, make_fill, plan, prompt_for  # noqa: E402
from benchmarks.harness import Harness, fmt, lookup, markdown_table, match_stats, sync, write_results  # noqa: E402
from benchmarks.harness import free_memory as free  # noqa: E402
from experiments import run_torch as rt  # noqa: E402
from wicore.hal import GIB  # noqa: E402
from wicore.model.checkpoint import load_spec_file  # noqa: E402
from wicore.model.kv_cache import KVCache  # noqa: E402
from wicore.model.spec import ModelSpec  # noqa: E402
from wicore.model.transformer import Transformer, to_torch_dtype  # noqa: E402
from wicore.runtime.kv_swap import swap_names  # noqa: E402
from wicore.runtime.nvme_store import NvmeStore, mount_of  # noqa: E402
from wicore.runtime.offload import offload_model  # noqa: E402
from wicore.server.cli import compose  # noqa: E402
from wicore.types import StepPlan  # noqa: E402

GB = 1e9
NO_GPU = "gpu_tiers: no CUDA device available (torch.cuda.is_available() is False); nothing to benchmark, exiting 0."
H = Harness("gpu_tiers")
log = H.log
KV_MODES = ("nopreempt", "swap", "recompute")
INT4_BYTES_PER_VALUE = 20 / 32  # Q4_1-like: 16 bytes of nibbles + fp16 scale + fp16 min per 32 values


# ----- pure helpers (unit-tested) ------------------------------------------------------------------
def pages_for(tokens: int, page_tokens: int) -> int:
    return -(-tokens // page_tokens)


def swap_kv_pages(concurrency: int, prompt: int, output: int, page_tokens: int, fraction: float) -> int:
    """KV pages for ``fraction`` of what ``concurrency`` requests need at full length (at least one request's
    worth, or the scheduler rejects them): the scheduler runs out of pages while they decode and preempts."""
    per = pages_for(prompt + output, page_tokens)
    return max(per, int(fraction * concurrency * per))


def compare_tokens(ours: dict[int, list[int]], ref: dict[int, list[int]]) -> dict[str, Any]:
    """Generated tokens of every request of ``ref`` against ``ours``: identical requests, agreeing tokens,
    the earliest divergence (None when all are identical)."""
    stats = {rid: match_stats(ours.get(rid, []), toks) for rid, toks in ref.items()}
    same = [rid for rid, s in stats.items() if s["matching"] == s["compared"] == len(ref[rid]) == len(ours.get(rid, []))]
    diverged = [s["prefix"] for rid, s in stats.items() if rid not in same]
    return {"requests": len(ref), "identical_requests": len(same), "all_identical": len(same) == len(ref) > 0,
            "matching_tokens": sum(s["matching"] for s in stats.values()),
            "compared_tokens": sum(s["compared"] for s in stats.values()),
            "first_divergence": min(diverged) if diverged else None,
            "missing_requests": sorted(set(ref) - set(ours))}


def tokens_cell(c: Any) -> str:
    if not isinstance(c, dict):
        return fmt(c)
    text = f"{c['identical_requests']}/{c['requests']} requests identical ({c['matching_tokens']}/{c['compared_tokens']} tokens"
    return text + (f"; first divergence at token {c['first_divergence']})" if c["first_divergence"] is not None else ")")


def failures(node: Any, path: str = "") -> list[str]:
    """Dotted paths of every dict holding an ``error`` (a failed section or run)."""
    if not isinstance(node, dict):
        return []
    if "error" in node:
        return [path or "."]
    return [p for k, v in node.items() for p in failures(v, f"{path}.{k}" if path else str(k))]


def host_available_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


# ----- runs through experiments.run_torch ------------------------------------------------------------
class KVCheck:
    """Wraps ``backend._move_kv``: clones each slot about to be swapped out (on the compute stream, before the
    copy stream's swap-out, which waits for it) and compares the slot it is swapped into bit for bit."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.saved: dict[int, list[torch.Tensor]] = {}
        self.checked = self.exact = self.unchecked = 0
        self.mismatches: list[int] = []
        self._orig = backend._move_kv
        backend._move_kv = self.move

    def _bufs(self) -> list[torch.Tensor]:
        c = self.backend.cache
        return [c.k[i] for i in c.layers] + [c.v[i] for i in c.layers]

    def move(self, plan: StepPlan) -> Any:
        b = self.backend
        for rid in plan.kv_dropped:
            self.saved.pop(rid, None)
        outs, ins = swap_names(plan.memory_ops)
        for rid in outs:
            slot, n = b.slots.get(rid), b.kv_len.get(rid)
            if slot is not None and n:
                self.saved[rid] = [t[slot, :, :n].clone() for t in self._bufs()]
        step = self._orig(plan)
        for rid in ins:
            before = self.saved.pop(rid, None)
            if before is None:
                self.unchecked += 1
                continue
            slot = b.slots[rid]
            self.checked += 1
            if all(torch.equal(t[slot, :, :x.shape[1]], x) for t, x in zip(self._bufs(), before)):
                self.exact += 1
            else:
                self.mismatches.append(rid)
        return step

    def result(self) -> dict[str, Any]:
        return {"swap_ins_checked": self.checked, "bit_exact": self.exact, "unchecked": self.unchecked,
                "mismatched_requests": self.mismatches[:20], "ok": self.checked == self.exact}


@dataclass
class Run:
    summary: dict[str, Any]
    tokens: dict[int, list[int]]  # request id -> generated tokens
    setup: Any  # experiments.run_torch.TorchSetup
    info: dict[str, Any]  # backend.describe() after the run
    stream: dict[str, Any] | None  # LayerStreamer.stats() after the run (weight streaming only)
    check: KVCheck | None


def run_capture(overrides: list[str], out_dir: Path, kv_check: bool = False) -> Run:
    """``run_torch`` on ``compose(overrides)``, with the generated tokens of every request captured and (with
    weight streaming) the streamer's stats read (its counters start after the warm-up) and it closed after."""
    holder: list[Any] = []
    tokens: dict[int, list[int]] = {}
    checks: list[KVCheck] = []
    build = rt.build_torch

    def build_and_wrap(cfg: Any) -> Any:
        s = build(cfg)
        holder.append(s)
        backend, release = s.backend, s.backend.release

        def keep(rid: int) -> None:
            if rid >= 0:  # negative ids: warm-up requests
                req = backend.requests.get(rid)
                toks = backend.tokens.get(rid, [])
                tokens[rid] = list(toks[req.prompt_tokens:] if req is not None else toks)
            release(rid)

        backend.release = keep
        if kv_check:
            checks.append(KVCheck(backend))
        return s  # the warm-up has reset the streamer's counters: they count the run

    try:
        with mock.patch.object(rt, "build_torch", build_and_wrap):
            summary = rt.run_torch(compose(overrides), out_dir)
        s = holder[0]
        st = getattr(s.backend, "streamer", None)
        stream = st.stats() if st is not None else None
        return Run(summary, tokens, s, s.backend.describe(), stream, checks[0] if checks else None)
    finally:
        for s in holder:
            st = getattr(s.backend, "streamer", None)
            if st is not None:
                st.close()  # removes the NVMe store's files


def common_overrides(model: str, device: torch.device, dtype: str | None, seed: int, requests: int,
                     concurrency: int, prompt: int, output: int, max_len: int) -> list[str]:
    return [f"model={model}", *([f"model.dtype={dtype}"] if dtype else []), "backend=torch",
            f"backend.device={device}", f"backend.max_len={max_len}", "report.enabled=false", "progress=false",
            f"seed={seed}", "workload=chat", f"workload.num_requests={requests}",
            f"workload.concurrency={concurrency}", "workload.think_time_s=0", "workload.prompt.kind=fixed",
            f"workload.prompt.value={prompt}", "workload.output.kind=fixed", f"workload.output.value={output}",
            f"scheduler.max_num_seqs={concurrency}", "scheduler.batching=continuous"]


def spec_of(model: str, dtype: str | None) -> ModelSpec:
    """The spec build_torch uses on a bf16-capable GPU (``dtype: auto`` -> bf16 in load_spec_file)."""
    spec = load_spec_file(ROOT / "conf" / "model" / f"{model}.yaml")
    return spec.with_dtype(dtype) if dtype else spec


# ----- A. KV swapping -------------------------------------------------------------------------------
def kv_stats(run: Run) -> dict[str, Any]:
    s, info = run.summary, run.info
    steps = run.setup.recorder.frames()[1]
    ops = run.setup.recorder.ops  # (step, replica, name, resource, start, end, bytes)
    out: dict[str, Any] = {
        "output_tok_s": float(s["output_tokens_per_s"]), "tpot_p50_ms": float(s["tpot_p50"]) * 1e3,
        "duration_s": float(s["duration_s"]), "finished": int(s["finished"]), "steps": int(s["steps"]),
        "preemptions": int(steps["preempted"].sum()), "cuda_graphs": info.get("cuda_graphs"),
        "kv_slots": info.get("kv_slots"), "steps_link_bytes": int(steps["link_bytes"].sum()),
        "steps_transfer_s": float(steps["transfer_s"].sum()), "warmup": run.setup.warmup}
    if "kv_swaps_out" in info:
        for d in ("out", "in"):
            nbytes = int(info[f"kv_swap_{d}_bytes"])
            secs = sum(op[5] - op[4] for op in ops if op[2] == f"swap_{d}")
            n_ops = sum(1 for op in ops if op[2] == f"swap_{d}")
            out.update({f"swaps_{d}": int(info[f"kv_swaps_{d}"]), f"swap_{d}_bytes": nbytes,
                        f"swap_{d}_steps": n_ops, f"swap_{d}_s": secs,
                        f"swap_{d}_GBps": nbytes / secs / GB if secs > 0 else float("nan")})
        total = out["swap_out_bytes"] + out["swap_in_bytes"]
        copy_s = float(info["kv_swap_copy_s"])
        out.update({"swap_copy_s": copy_s, "swap_GBps": total / copy_s / GB if copy_s > 0 else float("nan"),
                    "swap_bytes_per_swap": total / max(1, out["swaps_out"] + out["swaps_in"]),
                    "swap_ops_bytes": int(sum(op[6] for op in ops if op[2] in ("swap_out", "swap_in"))),
                    "kv_swapped_at_end": int(info["kv_swapped_now"])})
    else:
        out.update({"swaps_out": 0, "swaps_in": 0, "swap_out_bytes": 0, "swap_in_bytes": 0})
    if run.check is not None:
        out["kv_check"] = run.check.result()
    return out


def kv_run(r: dict[str, Any], name: str, kind: str, overrides: list[str], run_dir: Path,
           ref: dict[int, list[int]] | None, kv_check: bool, pages: int) -> None:
    run = run_capture(overrides, run_dir, kv_check=kv_check)
    r["dtype"] = run.setup.spec.dtype
    r.update(kv_stats(run))
    r["_tokens"] = run.tokens
    if kind == "nopreempt" and r["preemptions"]:
        r["warning"] = "the run without a KV page limit preempted"
    if kind != "nopreempt":
        if ref is not None:
            r["tokens_vs_nopreempt"] = compare_tokens(run.tokens, ref)
        if r["preemptions"] == 0:
            r["warning"] = f"no preemption with backend.kv_pages={pages}: lower --kv-fraction"
        if kind == "swap" and r["swaps_out"] == 0:
            r["warning"] = "preempted without a swap (every preemption was of a request still in its prefill)"
    log(f"{name}: {r['output_tok_s']:.1f} tok/s, {r['preemptions']} preemptions, swaps "
        f"{r['swaps_out']}/{r['swaps_in']}, {(r['swap_out_bytes'] + r['swap_in_bytes']) / 1e6:.1f} MB"
        + (f" in {r['swap_copy_s'] * 1e3:.2f} ms ({r['swap_GBps']:.2f} GB/s)" if "swap_copy_s" in r else "")
        + (f", KV check {r['kv_check']['bit_exact']}/{r['kv_check']['swap_ins_checked']} bit-exact"
           if "kv_check" in r else "")
        + (f", tokens {tokens_cell(r['tokens_vs_nopreempt'])}" if "tokens_vs_nopreempt" in r else ""))


def section_kv_swap(results: dict[str, Any], args: argparse.Namespace, device: torch.device, runs_dir: Path) -> None:
    kv = results.setdefault("kv_swap", {})
    pt = args.page_tokens
    max_len = args.prompt + args.output + 8
    full = args.concurrency * max_len // pt
    pages = swap_kv_pages(args.concurrency, args.prompt, args.output, pt, args.kv_fraction)
    spec = spec_of(args.model, args.dtype)
    kv["config"] = {"model": args.model, "dtype": args.dtype or "auto", "requests": args.requests,
                    "concurrency": args.concurrency, "prompt": args.prompt, "output": args.output,
                    "page_tokens": pt, "max_len": max_len, "kv_pages_full": full, "kv_pages_swap": pages,
                    "pages_needed_at_full_length": args.concurrency * pages_for(args.prompt + args.output, pt),
                    "kv_bytes_per_token": 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim
                    * to_torch_dtype(spec.dtype).itemsize}
    base = [*common_overrides(args.model, device, args.dtype, args.seed, args.requests, args.concurrency,
                              args.prompt, args.output, max_len), f"memory.page_tokens={pt}"]
    extra = {"nopreempt": [], "swap": ["scheduler.preemption=swap", f"backend.kv_pages={pages}"],
             "recompute": ["scheduler.preemption=recompute", f"backend.kv_pages={pages}"]}
    modes = [("eager", "false")] + ([] if args.skip_graphs else [("graphs", "true")])
    last = args.first_run_est_s
    for mode, graphs in modes:
        ref: dict[int, list[int]] | None = None
        for kind in KV_MODES:
            name = f"{mode}_{kind}"
            est = last * (1.5 if graphs == "true" else 1.0)
            if H.elapsed() + est > args.max_s:
                kv[name] = {"skipped": f"estimated {est:.0f} s would end past --max-s={args.max_s:g}"}
                log(f"{name}: {kv[name]['skipped']}")
                continue
            with H.section(kv, name) as r:
                over = [*base, *extra[kind], f"backend.cuda_graphs={graphs}"]
                r["overrides"] = [*extra[kind], f"backend.cuda_graphs={graphs}"]
                kv_run(r, name, kind, over, runs_dir / f"kv_{name}", ref, kind == "swap" and args.kv_check, pages)
            if kind == "nopreempt":
                ref = r.get("_tokens")
            if "output_tok_s" in r:  # measured: the next run of the trio takes about as long
                last = float(r["section_s"]) * 1.2 + 2
            free(device)
    kv["config"]["dtype"] = next((kv[n]["dtype"] for n in kv if n != "config" and "dtype" in kv[n]),
                                 kv["config"]["dtype"])
    eager, graphs_ref = kv.get("eager_nopreempt", {}), kv.get("graphs_nopreempt", {})
    if "_tokens" in eager and "_tokens" in graphs_ref:
        kv["graphs_vs_eager_nopreempt"] = compare_tokens(graphs_ref["_tokens"], eager["_tokens"])


# ----- B(i). NVMe tier vs host tier through the engine ------------------------------------------------
def stream_stats(run: Run, n_layers: int) -> dict[str, Any]:
    s, info, st = run.summary, run.info, run.stream or {}
    out_tokens = float(s["output_tokens"])
    disk = int(st.get("disk_bytes", 0))
    return {"output_tok_s": float(s["output_tokens_per_s"]), "tpot_p50_ms": float(s["tpot_p50"]) * 1e3,
            "duration_s": float(s["duration_s"]), "finished": int(s["finished"]),
            "layers": f"{info.get('streamed_layers')} / {n_layers}", "num_streamed": info.get("streamed_layers"),
            "tier": run.setup.placement.offload_tier, "source": st.get("source"),
            "host_format": info.get("stream_host_format"), "forwards": st.get("forwards"),
            "bytes_per_forward": info.get("stream_bytes_per_forward"), "pcie_GBps": st.get("achieved_GBps"),
            "pcie_copy_s": st.get("copy_s"), "disk_bytes": disk, "disk_reads": st.get("disk_reads"),
            "disk_read_s": st.get("disk_read_s"), "disk_wait_s": st.get("disk_wait_s"),
            "disk_GBps": st.get("disk_GBps"), "disk_bytes_per_output_token": disk / out_tokens if out_tokens else None,
            "disk_io": st.get("disk_io"), "nvme_fs": st.get("nvme_fs"), "disk_file_bytes": st.get("disk_file_bytes"),
            "host_bytes": st.get("host_bytes"), "staging_bytes": st.get("staging_bytes")}


def tier_run(r: dict[str, Any], name: str, overrides: list[str], run_dir: Path, n_layers: int) -> None:
    run = run_capture(overrides, run_dir)
    r.update(stream_stats(run, n_layers))
    r["_tokens"] = run.tokens
    log(f"{name}: {r['layers']} layers streamed ({r['tier']}), {r['output_tok_s']:.2f} tok/s, PCIe "
        f"{r['pcie_GBps']:.1f} GB/s" + (f", drive {r['disk_bytes'] / GB:.3f} GB at {r['disk_GBps']:.2f} GB/s "
                                         f"({r['disk_io']}), waited {r['disk_wait_s']:.2f} s" if r["disk_bytes"] else ""))


def section_nvme_tier(results: dict[str, Any], args: argparse.Namespace, device: torch.device, runs_dir: Path,
                      work: Path) -> None:
    nv = results.setdefault("nvme_tier", {})
    spec = spec_of(args.model, args.dtype)
    budget = budget_for(spec, args.nvme_resident)
    max_len = args.nvme_prompt + args.nvme_output + 8
    nv["config"] = {"model": args.model, "gpu_budget_gib": budget, "resident_layers_planned": args.nvme_resident,
                    "requests": args.nvme_requests, "concurrency": args.nvme_concurrency,
                    "prompt": args.nvme_prompt, "output": args.nvme_output, "host_format": "int4"}
    base = [*common_overrides(args.model, device, args.dtype, args.seed, args.nvme_requests, args.nvme_concurrency,
                              args.nvme_prompt, args.nvme_output, max_len),
            f"backend.gpu_budget_gib={budget:.9f}", "backend.host_format=int4"]
    tiers = {"host_int4": ["memory.offload_to=cpu"],
             "nvme_int4": ["memory.offload_to=nvme", f"backend.nvme_dir={work / 'nvme_tier'}"]}
    est = 2 * args.first_run_est_s  # builds the model in host memory (random weights), quantizes, writes
    for name, extra in tiers.items():
        if H.elapsed() + est > args.max_s:
            nv[name] = {"skipped": f"estimated {est:.0f} s would end past --max-s={args.max_s:g}"}
            log(f"nvme_tier {name}: {nv[name]['skipped']}")
            continue
        with H.section(nv, name) as r:
            r["overrides"] = extra
            tier_run(r, name, [*base, *extra], runs_dir / f"nvme_tier_{name}", spec.num_layers)
        if "output_tok_s" in r:  # the drive's run: the host tier's plus the writes and reads
            est = 2 * float(r["section_s"]) + 10
        free(device)
    host, disk = nv.get("host_int4", {}), nv.get("nvme_int4", {})
    if "_tokens" in host and "_tokens" in disk:
        nv["tokens_nvme_vs_host"] = compare_tokens(disk["_tokens"], host["_tokens"])
        if host.get("output_tok_s") and disk.get("output_tok_s"):
            nv["nvme_over_host_tok_s"] = disk["output_tok_s"] / host["output_tok_s"]
    left = list((work / "nvme_tier").glob("wicore-nvme-*")) if (work / "nvme_tier").exists() else []
    nv["store_files_left"] = len(left)


# ----- B(ii). 27B shape at a 16 GiB budget: batch-1 decode from the drive vs from host memory ----------
def large_estimate(spec: ModelSpec, budget_gib: float) -> tuple[list[int], int, int]:
    """Streamed layers of ``spec`` at ``budget_gib`` (``StaticPlacement`` as in gpu_offload.py), their bytes in
    the model dtype and (about) in int4 on the drive."""
    p0 = plan(spec, budget_gib).placements[0]
    values = p0.streamed_bytes / to_torch_dtype(spec.dtype).itemsize
    return [layer for layer, _ in p0.streamed], p0.streamed_bytes, int(values * INT4_BYTES_PER_VALUE)


def run_large(out: dict[str, Any], spec: ModelSpec, budget_gib: float, source: str, device: torch.device,
              prompt: torch.Tensor, n: int, seed: int, store_dir: Path) -> None:
    streamed, model_bytes, est_bytes = large_estimate(spec, budget_gib)
    out.update({"spec": spec.name, "budget_GiB": budget_gib, "source": source, "host_format": "int4",
                "num_streamed": len(streamed), "layers": f"{len(streamed)} / {spec.num_layers}",
                "streamed_bytes_model_dtype": model_bytes})
    log(f"{spec.name} @ {budget_gib:.4g} GiB, {source}: {len(streamed)} of {spec.num_layers} layers stream "
        f"(int4, ~{est_bytes / GB:.1f} GB a forward)")
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(spec)
    model = model.to(dtype=to_torch_dtype(spec.dtype)).eval()
    store = NvmeStore(store_dir) if source == "nvme" else None
    st = offload_model(model, streamed, device, "int4", fill=make_fill(spec, device, seed), source=source,
                       store=store)
    try:
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        out["setup_s"] = time.perf_counter() - t0
        t = prompt.shape[1]
        cache = KVCache(spec, 1, t + n + 1, device, to_torch_dtype(spec.dtype))
        pos = torch.arange(t, t + n, device=device)

        def forward(ids: torch.Tensor, step: int | None) -> torch.Tensor:
            p = torch.arange(t, device=device)[None] if step is None else pos[step].view(1, 1)
            logits = model(ids, p, cache, last_only=True)
            assert isinstance(logits, torch.Tensor)
            return logits

        def on_start() -> None:  # decode counters only
            st.synchronize()
            st.reset_counters()

        with torch.inference_mode():
            res = decode(forward, prompt, n, device, on_start)
        res.pop("_first_logits")
        s = st.stats()
        reads = int(s["disk_reads"])
        per_token = s["disk_bytes"] / reads * len(streamed) if reads else 0.0  # one full tier read a forward
        out.update(res)
        out.update({
            "bytes_per_token_pcie": st.bytes_per_forward, "pcie_GBps": s["achieved_GBps"], "pcie_copy_s": s["copy_s"],
            "copy_busy_fraction": s["copy_s"] / res["decode_s"] if res["decode_s"] else float("nan"),
            "disk_bytes": s["disk_bytes"], "disk_reads": reads, "disk_bytes_per_token": per_token,
            "disk_read_s": s["disk_read_s"], "disk_wait_s": s["disk_wait_s"],
            "disk_wait_s_per_token": s["disk_wait_s"] / n, "disk_GBps": s["disk_GBps"],
            "effective_disk_GBps": per_token * res["decode_tok_s"] / GB, "disk_io": s["disk_io"],
            "nvme_fs": s["nvme_fs"], "disk_file_bytes": s["disk_file_bytes"], "host_bytes": s["host_bytes"],
            "staging_bytes": s["staging_bytes"], "pinned_with": s["pinned_with"]})
        if device.type == "cuda":
            out["peak_gpu_GiB"] = torch.cuda.max_memory_allocated(device) / GIB
        log(f"{source}: {res['decode_tok_s']:.3f} tok/s ({res['ms_per_token']:.0f} ms/token), setup "
            f"{out['setup_s']:.1f} s" + (f", drive {per_token / GB:.2f} GB/token at {s['disk_GBps']:.2f} GB/s "
                                          f"({s['disk_io']}), waited {s['disk_wait_s']:.2f} s" if reads else "")
            + f", PCIe {s['achieved_GBps']:.1f} GB/s")
    finally:
        st.close()  # removes the store's files (the caller frees the memory once this frame is gone)


def section_nvme_scale(results: dict[str, Any], args: argparse.Namespace, device: torch.device, work: Path,
                       large: ModelSpec) -> None:
    sc = results.setdefault("nvme_scale", {})
    streamed, _, est_bytes = large_estimate(large, args.large_budget_gib)
    prompt = prompt_for(large, args.prompt_len, args.seed, device)
    forwards = args.tokens + 3  # warm-up + timed prefill + decode steps + the next forward's prefetch
    disk_bw = lookup(results, "nvme_tier.nvme_int4.disk_GBps")
    disk_bw = float(disk_bw) if isinstance(disk_bw, float) and math.isfinite(disk_bw) and disk_bw > 0 else 2.0
    sc["config"] = {"spec": large.name, "budget_GiB": args.large_budget_gib, "prompt_len": args.prompt_len,
                    "tokens": args.tokens, "streamed_layers": len(streamed), "int4_bytes_est": est_bytes,
                    "disk_GBps_assumed_for_estimate": disk_bw}
    def run_tier(key: str, tier: str, est: float, why_not: str | None) -> None:
        """``run_large`` on ``tier`` into ``sc[key]``, unless ``why_not`` or the time estimate ``est`` skip it."""
        if why_not is None and H.elapsed() + est > args.max_s:
            why_not = f"estimated {est:.0f} s would end past --max-s={args.max_s:g}"
        if why_not is not None:
            sc[key] = {"skipped": why_not}
            log(f"nvme_scale {key}: {why_not}")
            return
        with H.section(sc, key) as out:
            run_large(out, large, args.large_budget_gib, tier, device, prompt, args.tokens, args.seed,
                      work / "nvme_scale")
        free(device)

    free_disk = shutil.disk_usage(work).free
    run_tier("nvme_int4", "nvme", est_bytes / (1.0 * GB) + forwards * est_bytes / (disk_bw * GB) + 20,
             f"{free_disk / GB:.1f} GB free in {work}, the store needs ~{est_bytes / GB:.1f} GB"
             if free_disk < 1.1 * est_bytes + GIB else None)
    avail = host_available_bytes()
    setup_prev = lookup(results, "nvme_scale.nvme_int4.setup_s")
    est = (float(setup_prev) if isinstance(setup_prev, float) else est_bytes / GB) + forwards * est_bytes / (20 * GB) + 10
    host_why: str | None = None
    if args.skip_host_scale:
        host_why = "--skip-host-scale"
    elif avail is not None and avail < 1.5 * est_bytes + 8 * GIB:
        host_why = (f"host memory: {avail / GB:.1f} GB available, pinned int4 blocks need ~{est_bytes / GB:.1f} GB "
                    "(+ margin)")
    run_tier("host_int4", "host", est, host_why)
    a, b = sc.get("nvme_int4", {}), sc.get("host_int4", {})
    if a.get("decode_tok_s") and b.get("decode_tok_s"):
        sc["host_over_nvme_decode"] = b["decode_tok_s"] / a["decode_tok_s"]
        sc["tokens_nvme_vs_host"] = match_stats(a["tokens"], b["tokens"])


# ----- table -------------------------------------------------------------------------------------------
def _mb(v: Any) -> str:
    return fmt(v / 1e6, 1) if isinstance(v, int | float) else fmt(v)


def _pair(r: dict[str, Any], a: str, b: str, f: Callable[[Any], str]) -> str:
    return f"{f(r.get(a))} / {f(r.get(b))}"


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    disk = meta.get("disk", {})
    io_used = sorted({v for p in ("nvme_tier.nvme_int4.disk_io", "nvme_scale.nvme_int4.disk_io")
                      if isinstance(v := lookup(results, p), str) and v and not v.startswith("error")})
    env = [("card", meta.get("device")), ("torch", meta.get("torch")), ("CUDA", meta.get("cuda")),
           ("drive directory (--nvme-dir)", disk.get("dir")),
           ("drive filesystem / mount source", f"{disk.get('fs')} on {disk.get('source')} ({disk.get('mount')})"),
           ("O_DIRECT supported (probe)", disk.get("o_direct")),
           ("drive reads of the runs (disk_io)", ", ".join(io_used) if io_used else f"(probe) {disk.get('io_mode')}"),
           ("O_DIRECT used", any(v == "O_DIRECT" for v in io_used) if io_used else None),
           ("files removed at the end", meta.get("work_dir_removed")),
           ("total runtime (s)", meta.get("total_s")), ("failed sections", ", ".join(meta.get("failed_sections", [])) or "none")]
    lines = [markdown_table([(k, fmt(v)) for k, v in env])]
    kv = results.get("kv_swap", {})
    cfg = kv.get("config")
    if cfg:
        lines += ["", f"A. KV swapping: {cfg['model']} ({cfg['dtype']}), {cfg['requests']} requests, {cfg['concurrency']} "
                  f"concurrent, prompt {cfg['prompt']} / output {cfg['output']} tokens, greedy; KV pages "
                  f"{cfg['kv_pages_full']} (no limit) vs {cfg['kv_pages_swap']} of {cfg['page_tokens']} tokens "
                  f"({cfg['pages_needed_at_full_length']} needed at full length)", "",
                  "| run | output tok/s | TPOT p50 ms | preemptions | swaps out / in | swap MB out / in | "
                  "copy ms out / in | swap GB/s out / in (all) | KV bit-exact after swap-in | greedy tokens vs no-preemption run |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in kv.items():
            if name in ("config", "graphs_vs_eager_nopreempt") or not isinstance(r, dict):
                continue
            if "output_tok_s" not in r:
                lines.append(f"| {name} | {r.get('skipped') or str(r.get('error', 'failed'))[:120]} |||||||||")
                continue
            ms = _pair(r, "swap_out_s", "swap_in_s", lambda v: fmt(v * 1e3, 2) if isinstance(v, float) else "-")
            bw = _pair(r, "swap_out_GBps", "swap_in_GBps", lambda v: fmt(v, 2) if isinstance(v, float) else "-")
            if isinstance(r.get("swap_GBps"), float):
                bw += f" ({fmt(r['swap_GBps'], 2)})"
            kc = r.get("kv_check")
            kc_cell = f"{kc['bit_exact']}/{kc['swap_ins_checked']}" if isinstance(kc, dict) else "-"
            lines.append(f"| {name} | {fmt(r['output_tok_s'], 1)} | {fmt(r['tpot_p50_ms'], 2)} | {r['preemptions']} | "
                         f"{r['swaps_out']} / {r['swaps_in']} | {_pair(r, 'swap_out_bytes', 'swap_in_bytes', _mb)} | "
                         f"{ms} | {bw} | {kc_cell} | {tokens_cell(r.get('tokens_vs_nopreempt', '-'))} |")
        if "graphs_vs_eager_nopreempt" in kv:
            lines += ["", f"graphs vs eager, no preemption: {tokens_cell(kv['graphs_vs_eager_nopreempt'])} "
                          "(decode batches padded to graph buckets: other GEMM shapes)"]
    nv = results.get("nvme_tier", {})
    cfg = nv.get("config")
    if cfg:
        lines += ["", f"B(i). NVMe tier vs host tier through the engine: {cfg['model']}, GPU budget "
                  f"{cfg['gpu_budget_gib']:.3f} GiB, int4, {cfg['requests']} requests, {cfg['concurrency']} concurrent, "
                  f"prompt {cfg['prompt']} / output {cfg['output']}", "",
                  "| tier | layers streamed | output tok/s | forwards | MB per forward | drive GB read | drive GB/s "
                  "| drive wait s | PCIe GB/s | disk_io |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name in ("host_int4", "nvme_int4"):
            r = nv.get(name, {})
            if "output_tok_s" not in r:
                lines.append(f"| {name} | {r.get('skipped') or str(r.get('error', 'not run'))[:120]} ||||||||")
                continue
            disk = (f"{fmt(r['disk_bytes'] / GB, 3)} | {fmt(r['disk_GBps'], 2)} | {fmt(r['disk_wait_s'], 3)}"
                    if r["disk_bytes"] else "- | - | -")
            lines.append(f"| {name} | {r['layers']} | {fmt(r['output_tok_s'], 2)} | {fmt(r['forwards'])} | "
                         f"{_mb(r['bytes_per_forward'])} | {disk} | {fmt(r['pcie_GBps'], 2)} | {r['disk_io'] or '-'} |")
        if "tokens_nvme_vs_host" in nv:
            lines += ["", f"greedy tokens, NVMe vs host tier: {tokens_cell(nv['tokens_nvme_vs_host'])}; NVMe / host "
                          f"tokens/s {fmt(nv.get('nvme_over_host_tok_s'), 3)}; store directories left: "
                          f"{nv.get('store_files_left')}"]
    sc = results.get("nvme_scale", {})
    cfg = sc.get("config")
    if cfg:
        lines += ["", f"B(ii). {cfg['spec']} @ {cfg['budget_GiB']:.4g} GiB GPU budget, batch 1, prompt {cfg['prompt_len']}, "
                  f"{cfg['tokens']} decode steps, int4, {cfg['streamed_layers']} layers streamed", "",
                  "| tier | decode tok/s | ms/token | prefill s | drive GB/token | drive GB/s (reads) | effective drive "
                  "GB/s | drive wait s (per token) | PCIe GB/s | copy busy | setup s | peak GPU GiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in ("nvme_int4", "host_int4"):
            r = sc.get(name, {})
            if "decode_tok_s" not in r:
                lines.append(f"| {name} | {r.get('skipped') or str(r.get('error', 'not run'))[:120]} |||||||||||")
                continue
            disk = (f"{fmt(r['disk_bytes_per_token'] / GB, 3)} | {fmt(r['disk_GBps'], 2)} | "
                    f"{fmt(r['effective_disk_GBps'], 2)} | {fmt(r['disk_wait_s'], 2)} ({fmt(r['disk_wait_s_per_token'], 2)})"
                    if r["disk_reads"] else "- | - | - | -")
            lines.append(f"| {name} | {fmt(r['decode_tok_s'], 3)} | {fmt(r['ms_per_token'], 0)} | {fmt(r['prefill_s'], 2)} | "
                         f"{disk} | "
                         f"{fmt(r['pcie_GBps'], 2)} | {fmt(r['copy_busy_fraction'], 2)} | {fmt(r['setup_s'], 1)} | "
                         f"{fmt(r.get('peak_gpu_GiB'), 2)} |")
        if "host_over_nvme_decode" in sc:
            t = sc["tokens_nvme_vs_host"]
            lines += ["", f"host / NVMe decode tokens/s: {fmt(sc['host_over_nvme_decode'], 2)}; greedy tokens NVMe vs host: "
                          f"{t['matching']}/{t['compared']}"]
    for name in ("kv_swap", "nvme_tier", "nvme_scale", "main"):
        node = results.get(name)
        if isinstance(node, dict) and ("error" in node or "skipped" in node):
            lines += ["", f"{name}: {node.get('error') or 'skipped: ' + str(node['skipped'])}"]
    return "\n".join(lines) + "\n"


# ----- main --------------------------------------------------------------------------------------------
def write(results: dict[str, Any], out_dir: Path, show: bool = False) -> None:
    text = markdown(results)
    if show:
        print("\n" + text, flush=True)
    write_results(results, out_dir, text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_tiers")
    ap.add_argument("--nvme-dir", type=Path, default=None,
                    help="directory on the drive for the NVMe tier's files (default: the system temporary directory)")
    ap.add_argument("--model", default="gemma3-1b", help="conf/model name of sections A and B(i)")
    ap.add_argument("--dtype", default=None, help="model.dtype of sections A and B(i) (default: auto = bf16 on GPU)")
    ap.add_argument("--seed", type=int, default=0)
    # A
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--page-tokens", type=int, default=16)
    ap.add_argument("--kv-fraction", type=float, default=0.8,
                    help="backend.kv_pages of the preempting runs: this fraction of the pages needed at full length")
    ap.add_argument("--skip-graphs", action="store_true", help="no backend.cuda_graphs=true trio")
    ap.add_argument("--no-kv-check", dest="kv_check", action="store_false",
                    help="do not compare swapped-in KV slots bit for bit")
    # B(i)
    ap.add_argument("--nvme-requests", type=int, default=8)
    ap.add_argument("--nvme-concurrency", type=int, default=4)
    ap.add_argument("--nvme-prompt", type=int, default=64)
    ap.add_argument("--nvme-output", type=int, default=16)
    ap.add_argument("--nvme-resident", type=int, default=4, help="decoder layers kept on the GPU in B(i)")
    # B(ii)
    ap.add_argument("--large", default=str(ROOT / "conf" / "model" / "gemma3-27b.yaml"))
    ap.add_argument("--large-budget-gib", type=float, default=16.0)
    ap.add_argument("--tokens", type=int, default=6, help="timed decode steps of B(ii)")
    ap.add_argument("--prompt-len", type=int, default=64, help="prompt of B(ii)")
    ap.add_argument("--skip-scale", action="store_true", help="no B(ii)")
    ap.add_argument("--skip-host-scale", action="store_true", help="B(ii) on the NVMe tier only")
    ap.add_argument("--max-s", type=float, default=330.0, help="skip sections that would end later (seconds)")
    ap.add_argument("--first-run-est-s", type=float, default=25.0, help="time guard: a run before one was timed")
    ap.add_argument("--cpu-smoke", action="store_true", help="dev: tiny shapes on the CPU, every section's code path")
    return ap.parse_args(argv)


def smoke_args(args: argparse.Namespace) -> ModelSpec:
    """Tiny shapes for --cpu-smoke; returns the spec replacing the 27B one."""
    args.model, args.dtype = "tiny-gemma3", None
    args.requests, args.concurrency, args.prompt, args.output, args.page_tokens = 6, 3, 20, 10, 8
    args.nvme_requests, args.nvme_concurrency, args.nvme_prompt, args.nvme_output, args.nvme_resident = 3, 3, 10, 4, 2
    args.tokens, args.prompt_len, args.first_run_est_s = 3, 8, 5.0
    tiny = load_spec_file(ROOT / "conf" / "model" / "tiny-gemma3.yaml").with_dtype("bf16")
    args.large_budget_gib = budget_for(tiny, 2)
    return tiny


def main(argv: list[str] | None = None) -> int:
    H.restart()
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_GPU, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"status": "skipped", "reason": NO_GPU}) + "\n")
        return 0
    threads = torch.get_num_threads()
    if args.cpu_smoke:
        device = torch.device("cpu")
        large = smoke_args(args)
        torch.set_num_threads(1)  # tiny matmuls: one thread is fastest (restored at the end)
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        large = load_spec_file(args.large)
    base = args.nvme_dir.expanduser() if args.nvme_dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_tiers_", dir=base))
    runs_dir = args.out / "runs"
    results: dict[str, Any] = {"meta": {
        "torch": torch.__version__, "python": platform.python_version(), "args": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})"}}
    meta = results["meta"]
    if device.type == "cuda":
        meta.update({"cuda": torch.version.cuda, "gpu_mem_GiB": torch.cuda.get_device_properties(device).total_memory / GIB})
    avail = host_available_bytes()
    meta["host_mem_available_GB"] = avail / GB if avail else None
    failed: list[str] = []
    try:
        probe = NvmeStore(work)  # the drive: filesystem, whether O_DIRECT works there
        meta["disk"] = {"dir": str(base), **mount_of(work), "o_direct": probe.direct, "io_mode": probe.io_mode,
                        "free_GB": shutil.disk_usage(work).free / GB}
        probe.close()
        log(f"device {meta['device']}, torch {torch.__version__}; drive dir {base} ({meta['disk']['fs']} on "
            f"{meta['disk']['source']}, reads {probe.io_mode})")
        with H.section(results, "kv_swap"):
            section_kv_swap(results, args, device, runs_dir)
        write(results, args.out)
        with H.section(results, "nvme_tier"):
            section_nvme_tier(results, args, device, runs_dir, work)
        write(results, args.out)
        if args.skip_scale:
            results["nvme_scale"] = {"skipped": "--skip-scale"}
        else:
            with H.section(results, "nvme_scale"):
                section_nvme_scale(results, args, device, work, large)
    except Exception as exc:  # noqa: BLE001 - recorded; the results so far are still written
        results["main"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        log(f"FAILED: {results['main']['error']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        meta["work_dir_removed"] = not work.exists()
        meta["total_s"] = H.elapsed()
        failed = failures({k: v for k, v in results.items() if k != "meta"})
        meta["failed_sections"] = failed
        write(results, args.out, show=True)
        log(f"wrote {args.out / 'results.json'} and {args.out / 'table.md'}")
        torch.set_num_threads(threads)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
