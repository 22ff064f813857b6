"""Load test of the OpenAI-compatible server: concurrent streaming clients on loopback.

    python benchmarks/server_load.py            # all scenarios (~2 min on a 2-core CPU)
    python benchmarks/server_load.py --quick    # fewer requests

For each scenario a server process is started (``wicore serve``), 32 closed-loop
clients stream ``/v1/completions`` (token-id prompts of fixed length, ``ignore_eos``)
until the request budget is spent, optionally disconnecting mid-stream; the script
reports errors, p50/p99 TTFT and inter-token latency measured at the client,
output tokens/s, and reads ``/status`` afterwards: nothing may still run or wait and
the KV pages (and the torch backend's KV slots) must be back to zero. Digital-twin
scenarios also show the simulator's own prediction for the same closed loop.
Writes ``benchmarks/results/server_load/{results.json,table.md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "server_load"
sys.path.insert(0, str(ROOT))


@dataclass
class Scenario:
    name: str
    args: list[str]
    requests: int
    prompt: int
    output: int
    users: int = 32
    disconnect: float = 0.0  # share of requests whose client hangs up mid-stream
    twin: list[str] = field(default_factory=list)  # hydra overrides of the twin (for the prediction)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(args: list[str], log: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "wicore.cli", "serve", "--port", str(port), *args],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(log.read_text()[-2000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


async def run_load(url: str, model: str, sc: Scenario, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    ttft: list[float] = []
    itl: list[float] = []
    errors: list[str] = []
    counter = {"next": 0, "ok": 0, "disconnected": 0, "tokens": 0}
    limits = httpx.Limits(max_connections=sc.users + 8, max_keepalive_connections=sc.users + 8)

    async def one(ac: httpx.AsyncClient, hang_up_after: int | None) -> None:
        body = {"model": model, "prompt": [rng.randrange(10, 250) for _ in range(sc.prompt)],
                "max_tokens": sc.output, "stream": True, "ignore_eos": True, "temperature": 0.8,
                "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        last = None
        chunks = 0
        async with ac.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                errors.append(f"{r.status_code} {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    errors.append(str(obj["error"]))
                    return
                if obj.get("usage"):
                    counter["tokens"] += obj["usage"]["completion_tokens"]
                if obj.get("choices") and obj["choices"][0]["text"]:
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - t0)
                    else:
                        itl.append(now - last)
                    last = now
                    chunks += 1
                    if hang_up_after is not None and chunks >= hang_up_after:
                        counter["disconnected"] += 1
                        return  # leaving the block closes the connection mid-stream
        counter["ok"] += 1

    async def user(ac: httpx.AsyncClient) -> None:
        while counter["next"] < sc.requests:
            counter["next"] += 1
            hang = rng.randint(1, max(1, sc.output // 2)) if rng.random() < sc.disconnect else None
            try:
                await one(ac, hang)
            except httpx.HTTPError as e:
                errors.append(repr(e))

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=limits) as ac:
        await asyncio.gather(*(user(ac) for _ in range(sc.users)))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "ttft": ttft, "itl": itl, "errors": errors, **counter}


def wait_idle(url: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st: dict[str, Any] = httpx.get(url + "/status").json()
        busy = st["running"] + st["waiting"] + st["outstanding"] + st["kv_pages_used"]
        if busy + st["backend"].get("kv_slots_used", 0) == 0 or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def prediction(sc: Scenario) -> dict[str, float]:
    from experiments.build import build_sim
    from tests.conftest import make_cfg

    cfg = make_cfg(*sc.twin, "workload=chat", f"workload.concurrency={sc.users}",
                   f"workload.num_requests={sc.requests}", "workload.prompt.kind=fixed",
                   f"workload.prompt.value={sc.prompt}", "workload.output.kind=fixed",
                   f"workload.output.value={sc.output}")
    s = build_sim(cfg)
    end = s.driver.run()
    req, steps, _ = s.recorder.frames()
    gaps = np.diff(steps["end"].to_numpy())
    return {"ttft_p50": float(req.ttft.median()), "ttft_p99": float(req.ttft.quantile(0.99)),
            "itl_p50": float(np.median(gaps)), "tokens_per_s": float(req.output_tokens.sum() / end), "end_s": end}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1e3 if xs else float("nan")


def run(sc: Scenario, tmp: Path) -> dict[str, Any]:
    with server(sc.args, tmp / f"{sc.name}.log") as url:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        res = asyncio.run(run_load(url, model, sc))
        st = wait_idle(url)
    row = {"scenario": sc.name, "server": " ".join(sc.args), "requests": sc.requests, "clients": sc.users,
           "prompt_tokens": sc.prompt, "max_tokens": sc.output, "completed": res["ok"],
           "disconnected": res["disconnected"], "errors": len(res["errors"]), "error_samples": res["errors"][:3],
           "ttft_p50_ms": pct(res["ttft"], 50), "ttft_p99_ms": pct(res["ttft"], 99),
           "itl_p50_ms": pct(res["itl"], 50), "itl_p99_ms": pct(res["itl"], 99),
           "output_tokens": res["tokens"], "tokens_per_s": res["tokens"] / res["wall_s"], "wall_s": res["wall_s"],
           "after": {k: st[k] for k in ("running", "waiting", "outstanding", "kv_pages_used", "steps")} |
           {"kv_slots_used": st["backend"].get("kv_slots_used"), "twin_lag_s": st["backend"].get("lag_s"),
            "tiers": st["tiers"]}}
    if sc.twin and not sc.disconnect:
        row["predicted"] = prediction(sc)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| scenario | requests (ok / hung up / errors) | TTFT p50 / p99 ms | ITL p50 / p99 ms | tokens/s | "
            "sim prediction TTFT p50 / ITL p50 ms / tokens/s | after: running, waiting, KV pages, slots |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        p = r.get("predicted")
        pred = f"{p['ttft_p50'] * 1e3:.1f} / {p['itl_p50'] * 1e3:.1f} / {p['tokens_per_s']:.0f}" if p else "-"
        a = r["after"]
        lines.append(f"| {r['scenario']} | {r['requests']} ({r['completed']} / {r['disconnected']} / {r['errors']}) "
                     f"| {r['ttft_p50_ms']:.1f} / {r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.1f} / "
                     f"{r['itl_p99_ms']:.1f} | {r['tokens_per_s']:.0f} | {pred} | {a['running']}, {a['waiting']}, "
                     f"{a['kv_pages_used']}, {a['kv_slots_used'] if a['kv_slots_used'] is not None else '-'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated scenario names")
    args = ap.parse_args()
    k = 4 if args.quick else 1
    tmp = Path(tempfile.mkdtemp(prefix="server_load_"))
    from wicore.model.checkpoint import load_spec_file, write_random_checkpoint

    ckpt = write_random_checkpoint(load_spec_file(ROOT / "conf/model/tiny-gemma3.yaml"), tmp / "tiny", dtype="fp32")
    t4 = ["hardware=t4", "model=gemma3-1b"]
    ref = ["hardware=t10x2", "model=gemma3-27b"]
    torch = ["--checkpoint", str(ckpt), "model=tiny-gemma3", "--threads", "1"]
    scenarios = [
        Scenario("twin T4 Gemma-3-1B", ["--backend", "sim", *t4], 512 // k, 128, 64, twin=t4),
        Scenario("twin T4 Gemma-3-1B, 25% hang up", ["--backend", "sim", *t4], 256 // k, 128, 64,
                 disconnect=0.25, twin=t4),
        Scenario("twin 2xT10 Gemma-3-27B (reference)", ["--backend", "sim", *ref], 64 // k, 128, 16, twin=ref),
        Scenario("real tiny-gemma3 (CPU)", torch, 256 // k, 64, 32),
        Scenario("real tiny-gemma3 (CPU), 25% hang up", torch, 128 // k, 64, 32, disconnect=0.25),
    ]
    if args.only:
        keep = {s.strip() for s in args.only.split(",")}
        scenarios = [s for s in scenarios if s.name in keep]
    rows = []
    for sc in scenarios:
        print(f"running: {sc.name} ...", flush=True)
        rows.append(run(sc, tmp))
    md = table(rows)
    print(md)
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"machine": machine, "python": platform.python_version(),
                                                  "rows": rows}, indent=2, default=float) + "\n")
    (OUT / "table.md").write_text(f"Machine: {machine}. Client and server share the machine.\n\n{md}\n")
    bad = [r["scenario"] for r in rows if r["errors"] or r["after"]["kv_pages_used"] or r["after"]["running"]]
    if bad:
        print("FAILED:", bad)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
