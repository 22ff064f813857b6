"""Where the spread of a host-bound step comes from: host launch time vs GPU time, eager vs CUDA graphs.

    python benchmarks/gpu_step_modes.py --out DIR [--model gemma3-1b] [--reps 150]

The same Gemma-3-1B-shaped steps (random bf16 weights) run eagerly and through the runtime's CUDA
graphs (``GraphPrefill`` / ``GraphDecode``), round-robin, ``--reps`` times each, so every case sees
the same machine conditions over time. For every execution it records:

* ``host_s``: wall time of the Python call that issues the work (the forward, or the graph replay),
  before any synchronisation: the host's launch cost;
* ``cpu_s``: CPU time of this thread over that call (``time.thread_time``): a host that is slow
  because it is descheduled shows ``host_s`` >> ``cpu_s``; a slow CPU shows both up;
* ``gpu_s``: CUDA-event time from before the first kernel to after the last one;
* ``wall_s``: from the call to the end of ``torch.cuda.synchronize``: what a step costs.

Cases: ``prefill{T}_{eager,graph}`` (one chunk of T tokens into a fresh slot, T = 128 and 1,024),
``decode1_{eager,graph}`` (one row at context 256), and ``step_prefill128_{eager,graph}``: the whole
step through ``TorchBackend.execute`` (forward, sampling, the host sync), as a run records it.

``table.md``: p10 / p50 / p90 of each time per case, and the share of executions in a slow mode
(wall > 1.4 x the case's p10); ``results.json`` also keeps every sample in execution order, so mode
switches can be seen over time. ``--cpu-smoke`` runs every case on the CPU with tiny-gemma3 (no
events: ``gpu_s`` is then NaN).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks.harness import Harness, fmt, write_results  # noqa: E402
from wicore.model.kv_cache import KVCache  # noqa: E402
from wicore.model.spec import ModelSpec  # noqa: E402
from wicore.model.transformer import build_model, preferred_dtype  # noqa: E402
from wicore.report import md_table  # noqa: E402
from wicore.runtime.backend import TorchBackend  # noqa: E402
from wicore.runtime.graph_decode import GraphDecode  # noqa: E402
from wicore.runtime.graph_prefill import GraphPrefill  # noqa: E402
from wicore.types import BatchItem, Phase, Request, StepPlan  # noqa: E402

H = Harness("gpu_step_modes")
SLOW = 1.4  # a sample is in the slow mode above SLOW x the case's p10


def cpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                            "torch_threads": torch.get_num_threads()}
    if hasattr(os, "sched_getaffinity"):
        info["affinity"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        info["loadavg"] = os.getloadavg()
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
        info["cpu_mhz"] = {"min": min(mhz), "median": float(np.median(mhz)), "max": max(mhz)} if mhz else None
        model = [line.split(":")[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        info["cpu_model"] = model[0] if model else None
    except OSError:
        pass
    return info


class Timer:
    """One execution of ``issue`` timed four ways (module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self.ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))

    def __call__(self, issue: Callable[[], Any]) -> tuple[float, float, float, float]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        w0, c0 = time.perf_counter(), time.thread_time()
        if self.cuda:
            self.ev[0].record()
        issue()
        if self.cuda:
            self.ev[1].record()
        host, cpu = time.perf_counter() - w0, time.thread_time() - c0
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - w0
        gpu = self.ev[0].elapsed_time(self.ev[1]) / 1e3 if self.cuda else float("nan")
        return host, cpu, gpu, wall


def build_cases(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], Any]]:
    model = build_model(spec, device, dtype=dtype, seed=0)
    max_len = min(2048, spec.max_context)
    long = min(1024, max_len // 2)
    cache = KVCache(spec, 4, max_len, device=device, dtype=dtype)  # slot 3: the decode graphs' scratch slot
    gp, gd = GraphPrefill(model, cache), GraphDecode(model, cache, buckets=(1, 2, 3), scratch_slot=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab_size, (max_len,), generator=g).tolist()
    slot = torch.tensor([0], device=device)

    def eager_prefill(t: int) -> Callable[[], Any]:
        x = torch.tensor([ids[:t]])
        pos = torch.arange(t)[None, :]

        def run() -> Any:  # the input construction of TorchBackend.execute's eager prefill, inside the timing
            return model(x.to(device), pos.to(device), cache, slot.clone(), last_only=True)
        return run

    def eager_decode() -> Any:
        return model(torch.tensor([[ids[256]]], device=device), torch.tensor([[256]], device=device), cache,
                     torch.tensor([1], device=device), last_only=True)

    backends = {}
    for name, graphs in (("eager", False), ("graph", True)):
        be = TorchBackend(model, cache, time.perf_counter(), prefill_graphs=graphs)
        be.free_slots = [2]  # slot 2 only: the other cases use slots 0, 1 and the scratch slot 3
        backends[name] = be
    plan = StepPlan(1, 0, 0.0, [BatchItem(0, Phase.PREFILL, 128, 0, True)])

    def step(be: TorchBackend) -> Callable[[], Any]:
        def run() -> Any:
            be.release(0)
            be.add_request(Request(0, 0.0, 128, 4, prompt_ids=ids[:128]))
            return be.execute(plan)
        return run

    with torch.inference_mode():
        model(torch.tensor([ids[:257]], device=device), torch.arange(257, device=device)[None, :], cache,
              torch.tensor([1], device=device))  # the decode row's context
    return {"prefill128_eager": eager_prefill(128), "prefill128_graph": lambda: gp.run(ids[:128], 0, 0),
            f"prefill{long}_eager": eager_prefill(long), f"prefill{long}_graph": lambda: gp.run(ids[:long], 0, 0),
            "decode1_eager": eager_decode, "decode1_graph": lambda: gd.run([ids[256]], [256], [1]),
            "step_prefill128_eager": step(backends["eager"]), "step_prefill128_graph": step(backends["graph"])}


def summarize(samples: list[tuple[float, float, float, float]]) -> dict[str, Any]:
    a = np.asarray(samples)
    out: dict[str, Any] = {}
    for i, key in enumerate(("host_s", "cpu_s", "gpu_s", "wall_s")):
        col = a[:, i]
        out[key] = {f"p{q}": float(np.percentile(col, q)) for q in (10, 50, 90)}
    wall = a[:, 3]
    out["slow_share"] = float(np.mean(wall > SLOW * np.percentile(wall, 10)))
    out["p90_over_p10"] = float(np.percentile(wall, 90) / np.percentile(wall, 10))
    out["samples"] = len(a)
    return out


def markdown(results: dict[str, Any]) -> str:
    def ms(d: dict[str, float]) -> str:
        return " / ".join(fmt(1e3 * d[k], 2) for k in ("p10", "p50", "p90"))

    lines = [f"Device: {results['device_name']}; CPU: {results['cpu'].get('cpu_model')} "
             f"({results['cpu'].get('affinity')} usable cores); {results['reps']} executions per case, round-robin.",
             "", "Times in ms, p10 / p50 / p90. slow: share of executions with wall > "
             f"{SLOW} x the case's p10.", "",
             md_table(["case", "host launch", "host CPU", "GPU", "wall", "wall p90/p10", "slow"],
                      [[name, ms(r["host_s"]), ms(r["cpu_s"]), ms(r["gpu_s"]), ms(r["wall_s"]), f"{r['p90_over_p10']:.2f}",
                        f"{100 * r['slow_share']:.0f} %"] for name, r in results["cases"].items()])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_step_modes")
    ap.add_argument("--model", default="gemma3-1b")
    ap.add_argument("--reps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny-gemma3 on the CPU, a few reps")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        device, model_name, reps, warmup = torch.device("cpu"), "tiny-gemma3", 3, 1
    elif not torch.cuda.is_available():
        print("gpu_step_modes: no CUDA device (use --cpu-smoke for a CPU check)")
        return 0
    else:
        device, model_name, reps, warmup = torch.device("cuda"), args.model, args.reps, args.warmup
    data = yaml.safe_load((ROOT / "conf" / "model" / f"{model_name}.yaml").read_text())
    dtype = preferred_dtype(device)
    spec = ModelSpec.from_config({**data, "dtype": {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")})
    H.log(f"{spec.name} {dtype} on {device}")
    cases = build_cases(spec, device, dtype)
    timer = Timer(device)
    samples: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in cases}
    order: list[tuple[str, float]] = []
    with torch.inference_mode():
        for _ in range(warmup):  # captures the graphs, grows the allocator
            for fn in cases.values():
                timer(fn)
        t0 = time.perf_counter()
        for _ in range(reps):
            for name, fn in cases.items():
                s = timer(fn)
                samples[name].append(s)
                order.append((name, round(time.perf_counter() - t0, 4)))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    results: dict[str, Any] = {"device_name": dev_name, "torch": torch.__version__, "model": spec.name,
                               "dtype": str(dtype), "reps": reps, "cpu": cpu_info(),
                               "cases": {k: summarize(v) for k, v in samples.items()},
                               "samples": {k: [[round(x, 7) for x in s] for s in v] for k, v in samples.items()},
                               "order": order}
    table = markdown(results)
    write_results(results, args.out, table)
    print(table)
    H.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
