#!/usr/bin/env bash
# The real runtime behind the engine on a GPU: the same experiment config on
# backend=torch (random-weight Gemma-3-1B on the card) and backend=sim (the H100
# profile), both writing the same result schema. Usage (on the GPU machine):
#   OUT=/some/dir bash benchmarks/gpu_engine_run.sh
# Wheels for packages the GPU image lacks may be put in .whl/ (hydra, simpy, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
COMMON="model=gemma3-1b workload.num_requests=128 workload.concurrency=32 progress=false report.enabled=false"
python3 run_experiment.py backend=torch backend.max_len=4096 $COMMON hydra.run.dir=$OUT/torch 2>&1 | tail -3
python3 run_experiment.py hardware=h100 $COMMON hydra.run.dir=$OUT/sim 2>&1 | tail -3
python3 - <<'PY'
import json, os
out = os.environ["OUT"]
rows = []
for name in ("torch", "sim"):
    try:
        s = json.load(open(f"{out}/{name}/summary.json"))
    except OSError as e:
        print(name, "missing:", e)
        continue
    rows.append((name, s["run"]["hardware"], s["output_tokens_per_s"], s["ttft_p50"] * 1e3, s["tpot_p50"] * 1e3,
                 s["e2e_p50"], s["finished"]))
print("| backend | device | output tok/s | TTFT p50 ms | TPOT p50 ms | E2E p50 s | finished |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print("| %s | %s | %.1f | %.1f | %.2f | %.2f | %d |" % r)
PY
