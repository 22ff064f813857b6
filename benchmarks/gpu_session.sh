#!/usr/bin/env bash
# The GPU runs behind the committed GPU results of MoR routing, calibration + validation and
# pipeline parallelism, in stages that each fit one device call. Usage on the GPU machine:
#   OUT=/some/dir bash benchmarks/gpu_session.sh mor      # train the small model, MoR quality + speed
#   OUT=/some/dir bash benchmarks/gpu_session.sh profile  # profile -> calibration tables (the grid's models)
#   OUT=/some/dir bash benchmarks/gpu_session.sh validate # the validation grid's torch side (1 GPU)
#   OUT=/some/dir bash benchmarks/gpu_session.sh pp       # 2 GPUs: pipeline benchmark + the grid's 2-GPU entries
#   OUT=/some/dir bash benchmarks/gpu_session.sh pg-profile           # prefill graphs: tests, step modes, tables
#   OUT=/some/dir bash benchmarks/gpu_session.sh pg-validate          # ... then the grid on the same machine
#   OUT=/some/dir bash benchmarks/gpu_session.sh pg-validate-offload
# Everything a stage writes lands in $OUT/<stage>/ and is packed into $OUT/<stage>.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_env.sh
stage=${1:?stage: mor | profile | validate | same-machine | fidelity-profile | fidelity-profile2 | fidelity-profile-stream | fidelity-validate | same-profile | same-validate | pg-profile | pin-check | pg-profile2 | pg-profile-stream | pg-validate | pg-validate-offload | pv | pv-engine | pv2 | pv-offload | stream-graphs | probe | pp-validate | pp-graphs | pp-graphs-validate | pp-fidelity | decode-bw | tiers | graphs | pp}
R=$OUT/$stage
mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$R/gpus.csv" 2>&1
# gemma3-1b bf16 under the grid's two GPU budgets with the streamed layers streamed (the offloaded configs'
# tables, named without the card: rename them after the card they ran on): profile_streamed TIMEOUT [more args]
STREAM_GRID="--grid decode_batches=1,2,4,8,16 --grid decode_contexts=64,160,1024,1280 --grid prefill_tokens=16,128,1024
  --grid prefill_context_points= --grid overhead_batches=1,4,16 --grid check_points=1:160"
STREAM_PGRID=$(echo $STREAM_GRID | sed 's/--grid/--profile-grid/g')  # the same, for validate --profile
profile_streamed() {
  local limit=$1; shift
  mkdir -p "$R/calibration"
  for b in 4.0 4.5; do
    timeout "$limit" python3 -m wicore.cli profile --model gemma3-1b --dtype bf16 --device cuda --no-primitives \
      --gpu-budget-gib $b $STREAM_GRID "$@" --out "$R/calibration/gemma3-1b_bf16_gpu${b}g.csv" \
      > "$R/calibration/log_gpu${b}g.txt" 2>&1
    tail -1 "$R/calibration/log_gpu${b}g.txt"; date
  done
}

# validate --profile over the 1-GPU entries with CUDA graphs (profiled in the validation's own process)
G="--torch-extra backend.cuda_graphs=true backend.prefill_graphs=true --profile-grid reps=12 --profile-grid rounds=3"
# the GPU tests, then the offloaded entries (streamed layers inside the graphs) twice: pv_offload TIMEOUT
pv_offload() {
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_graph_stream.py tests/test_graph_prefill.py \
    tests/test_graph_decode.py tests/test_kv_swap.py tests/test_nvme_tier.py > "$R/gpu_tests.txt" 2>&1
  timeout "$1" python3 -m experiments.validate --backends torch --skip-2gpu --profile --repeat \
    --out "$R/validation_offload" --only '*gpu4*' $G $STREAM_PGRID > "$R/validate_offload_log.txt" 2>&1
}

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee "$R/torch.txt"
case $stage in
  mor)
    CK=/tmp/wicore-small
    # 5 passes over the corpus: the held-out loss is lowest there (8 passes overfit, see training_log.json)
    timeout 200 python3 -m experiments.train_small --out $CK --minutes 3 --epochs 5 --device cuda > "$R/train_log.txt" 2>&1
    tail -4 "$R/train_log.txt"; date
    mkdir -p "$R/model"
    cp $CK/training_log.json $CK/router_config.json $CK/signals.parquet $CK/config.json "$R/model/" 2>/dev/null
    timeout 120 python3 benchmarks/mor_quality.py --checkpoint $CK --device cuda --out "$R/mor_quality" > "$R/quality_log.txt" 2>&1
    tail -3 "$R/quality_log.txt"; date
    timeout 200 python3 -m benchmarks.gpu_mor --checkpoint $CK --out "$R/gpu_mor" > "$R/gpu_mor_log.txt" 2>&1
    tail -25 "$R/gpu_mor_log.txt"; date
    ;;
  profile)
    mkdir -p "$R/calibration"
    for md in tiny-gemma3:fp32:40 tiny-gemma3:bf16:40 gemma3-1b:bf16:200 gemma3-1b:fp16:200; do
      IFS=: read -r m d limit <<< "$md"
      extra=--no-primitives; [ "$m:$d" = gemma3-1b:bf16 ] && extra=""
      timeout $limit python3 -m wicore.cli profile --model $m --dtype $d --device cuda \
        --out "$R/calibration/h100_${m}_${d}.csv" $extra > "$R/calibration/log_${m}_${d}.txt" 2>&1
      tail -2 "$R/calibration/log_${m}_${d}.txt"; date
    done
    ;;
  validate)
    timeout ${VALIDATE_S:-500} python3 -m experiments.validate --backends torch --skip-2gpu --out "$R/validation" \
      > "$R/validate_log.txt" 2>&1
    tail -40 "$R/validate_log.txt"; date
    ;;
  same-machine)
    # calibration and validation on one machine: the runtime is host-bound, so machines differ
    mkdir -p "$R/calibration"
    for md in tiny-gemma3:fp32 gemma3-1b:bf16; do
      IFS=: read -r m d <<< "$md"
      timeout 150 python3 -m wicore.cli profile --model $m --dtype $d --device cuda --no-primitives \
        --out "$R/calibration/h100_${m}_${d}.csv" > "$R/calibration/log_${m}_${d}.txt" 2>&1
      tail -1 "$R/calibration/log_${m}_${d}.txt"; date
    done
    timeout 260 python3 -m experiments.validate --backends torch --skip-2gpu --out "$R/validation" \
      --only 'tiny-c*-short,tiny-c*-long,1b-c*-short,1b-c*-long,1b-*-static,1b-*-chunked' > "$R/validate_log.txt" 2>&1
    tail -5 "$R/validate_log.txt"; date
    ;;
  fidelity-profile)
    # calibration tables measured the way the validation runs run: CUDA-graph decode for the resident
    # configs (one table per model and dtype of the grid), eager (+ copies) for gemma3-1b bf16, whose
    # offloaded configs stream weights and therefore decode eagerly
    mkdir -p "$R/calibration"
    for mdg in tiny-gemma3:fp32:graphs:50 tiny-gemma3:bf16:graphs:50 gemma3-1b:bf16:graphs:120 \
               gemma3-1b:fp16:graphs:110 gemma3-1b:bf16:eager:240; do
      IFS=: read -r m d g limit <<< "$mdg"
      flags=--no-primitives; [ "$g" = graphs ] && flags="$flags --cuda-graphs"
      [ "$m:$d:$g" = gemma3-1b:bf16:eager ] && flags=""
      timeout $limit python3 -m wicore.cli profile --model $m --dtype $d --device cuda $flags \
        --out "$R/calibration/h100_${m}_${d}_${g}.csv" > "$R/calibration/log_${m}_${d}_${g}.txt" 2>&1
      tail -1 "$R/calibration/log_${m}_${d}_${g}.txt"; date
    done
    ;;
  fidelity-profile2)
    # the graph tables again, forwards and steps timed in interleaved rounds (the first tables had a slow
    # host phase over neighbouring prefill points)
    mkdir -p "$R/calibration"
    for mdg in gemma3-1b:bf16:115 gemma3-1b:fp16:105 tiny-gemma3:fp32:40 tiny-gemma3:bf16:40; do
      IFS=: read -r m d limit <<< "$mdg"
      timeout $limit python3 -m wicore.cli profile --model $m --dtype $d --device cuda --cuda-graphs --no-primitives \
        --out "$R/calibration/h100_${m}_${d}_graphs.csv" > "$R/calibration/log_${m}_${d}_graphs.txt" 2>&1
      tail -1 "$R/calibration/log_${m}_${d}_graphs.txt"; date
    done
    ;;
  fidelity-profile-stream)
    # gemma3-1b bf16 under the grid's two GPU budgets: whole steps with the streamed layers streamed
    mkdir -p "$R/calibration"
    profile_streamed 170 --grid reps=12 --grid rounds=3
    timeout 200 python3 -m pytest -q -m gpu tests/test_kv_swap.py tests/test_nvme_tier.py tests/test_graph_decode.py \
      -p no:cacheprovider > "$R/gpu_tests.txt" 2>&1
    tail -5 "$R/gpu_tests.txt"; date
    ;;
  same-profile)
    # calibration and validation on one machine (run same-validate right after, on the same warm lease):
    # the runtime is host-bound, so tables from another machine of the same kind are 10 % off
    mkdir -p "$R/calibration"
    Q="--grid reps=12 --grid rounds=3"
    for md in gemma3-1b:bf16 gemma3-1b:fp16 tiny-gemma3:fp32 tiny-gemma3:bf16; do
      IFS=: read -r m d <<< "$md"
      timeout 90 python3 -m wicore.cli profile --model $m --dtype $d --device cuda --cuda-graphs --no-primitives $Q \
        --out "$R/calibration/h100_${m}_${d}_graphs.csv" > "$R/calibration/log_${m}_${d}_graphs.txt" 2>&1
      tail -1 "$R/calibration/log_${m}_${d}_graphs.txt"; date
    done
    profile_streamed 120 $Q
    ;;
  same-validate)
    # every 1-GPU grid config, CUDA-graph decode; the resident ones twice (noise floor), the offloaded once
    timeout 330 python3 -m experiments.validate --backends torch --skip-2gpu --out "$R/validation" \
      --torch-extra backend.cuda_graphs=true --repeat --only 'tiny-*,1b-c*-short,1b-c*-long,1b-*-static,1b-*-chunked,1b-c16-mixed-*,*-fp16' \
      > "$R/validate_log.txt" 2>&1
    timeout 240 python3 -m experiments.validate --backends torch --out "$R/validation" --no-warmup \
      --torch-extra backend.cuda_graphs=true --only '*gpu4*' >> "$R/validate_log.txt" 2>&1
    grep -E "^\[|runs ok" "$R/validate_log.txt" | tail -70; date
    ;;
  pg-profile)
    # CUDA-graph prefill: GPU tests, the step-modes diagnosis, then calibration tables measured as the runs
    # run (decode and prefill graphs; the offloaded budgets eagerly, with their layers streamed). Run
    # pg-validate and pg-validate-offload right after, on the same warm lease.
    timeout 150 python3 -m pytest -q -m gpu tests/test_graph_prefill.py tests/test_graph_decode.py -p no:cacheprovider \
      > "$R/gpu_tests.txt" 2>&1
    tail -3 "$R/gpu_tests.txt"; date
    timeout 120 python3 benchmarks/gpu_step_modes.py --out "$R/gpu_step_modes" > "$R/step_modes_log.txt" 2>&1
    tail -14 "$R/step_modes_log.txt"; date
    mkdir -p "$R/calibration"
    Q="--grid reps=12 --grid rounds=3"
    for md in gemma3-1b:bf16:100 gemma3-1b:fp16:100 tiny-gemma3:fp32:40 tiny-gemma3:bf16:40; do
      IFS=: read -r m d limit <<< "$md"
      timeout $limit python3 -m wicore.cli profile --model $m --dtype $d --device cuda --cuda-graphs --prefill-graphs \
        --no-primitives $Q --out "$R/calibration/h100_${m}_${d}_graphs.csv" > "$R/calibration/log_${m}_${d}_graphs.txt" 2>&1
      tail -1 "$R/calibration/log_${m}_${d}_graphs.txt"; date
    done
    profile_streamed 100 $Q
    ;;
  pin-check)
    # does pinning the process to one CPU make host-bound steps agree between processes? tiny-gemma3 steps
    # in six processes, three free and three pinned with taskset (PIN_CPU, default 2)
    for i in 1 2 3; do
      timeout 60 python3 benchmarks/gpu_step_modes.py --model tiny-gemma3 --reps 40 --out "$R/free_$i" > /dev/null 2>&1
      timeout 60 taskset -c ${PIN_CPU:-2} python3 benchmarks/gpu_step_modes.py --model tiny-gemma3 --reps 40 \
        --out "$R/pin_$i" > /dev/null 2>&1
    done
    python3 - "$R" <<'PY'
import json, sys, glob
for d in sorted(glob.glob(sys.argv[1] + "/*_[0-9]")):
    c = json.load(open(d + "/results.json"))["cases"]
    print(d.rsplit("/", 1)[1], " ".join(f"{k} {1e3 * c[k]['wall_s']['p50']:.3f}" for k in
          ("decode1_graph", "step_prefill128_graph", "prefill128_eager")))
PY
    ;;
  pg-profile2)
    # the graph tables again with mean_s and prefill_step_pair, 20 timings a point (pg-profile-stream next)
    mkdir -p "$R/calibration"
    Q="--grid reps=20 --grid rounds=4"
    for md in gemma3-1b:bf16:150 gemma3-1b:fp16:150 tiny-gemma3:fp32:45 tiny-gemma3:bf16:45; do
      IFS=: read -r m d limit <<< "$md"
      timeout $limit ${PIN:-} python3 -m wicore.cli profile --model $m --dtype $d --device cuda --cuda-graphs \
        --prefill-graphs --no-primitives $Q --out "$R/calibration/${m}_${d}_graphs.csv" \
        > "$R/calibration/log_${m}_${d}_graphs.txt" 2>&1
      tail -1 "$R/calibration/log_${m}_${d}_graphs.txt"; date
    done
    ;;
  pg-profile-stream)
    profile_streamed 200 --grid reps=16 --grid rounds=4
    ;;
  pg-validate)
    # the resident 1-GPU configs with decode and prefill graphs, each run twice (noise floor); PIN: a command
    # prefix for the process (e.g. "taskset -c 2"), the same as pg-profile2's
    timeout 560 ${PIN:-} python3 -m experiments.validate --backends torch --skip-2gpu --out "$R/validation" \
      --torch-extra backend.cuda_graphs=true backend.prefill_graphs=true --repeat \
      --only 'tiny-*,1b-c*-short,1b-c*-long,1b-*-static,1b-*-chunked,1b-c16-mixed-*,*-fp16' > "$R/validate_log.txt" 2>&1
    grep -E "^\[|runs ok" "$R/validate_log.txt" | tail -60; date
    ;;
  pg-validate-offload)
    # the offloaded configs (their streamed layers keep prefill and decode eager), once
    timeout 300 python3 -m experiments.validate --backends torch --out "$R/validation" --no-warmup \
      --torch-extra backend.cuda_graphs=true backend.prefill_graphs=true --only '*gpu4*' > "$R/validate_log.txt" 2>&1
    grep -E "^\[|runs ok" "$R/validate_log.txt" | tail -10; date
    ;;
  decode-bw)
    timeout 570 python3 benchmarks/gpu_decode_bw.py --out "$R/gpu_decode_bw" --max-s 480 ${VARIANTS:+--variants $VARIANTS} \
      > "$R/log.txt" 2>&1
    tail -30 "$R/log.txt"; date
    ;;
  tiers)
    timeout 570 python3 benchmarks/gpu_tiers.py --out "$R/gpu_tiers" --nvme-dir /tmp/wicore-nvme > "$R/log.txt" 2>&1
    tail -40 "$R/log.txt"; date
    ;;
  fidelity-validate)
    # the grid's 1-GPU configs on the real runtime, CUDA-graph decode, each run twice (noise floor)
    timeout ${VALIDATE_S:-560} python3 -m experiments.validate --backends torch --skip-2gpu --out "$R/validation" \
      --torch-extra backend.cuda_graphs=true --repeat ${ONLY:+--only "$ONLY"} > "$R/validate_log.txt" 2>&1
    grep -E "^\[|runs ok" "$R/validate_log.txt" | tail -70; date
    ;;
  graphs)
    timeout 120 python3 -m pytest -q -m gpu tests/test_graph_decode.py -p no:cacheprovider 2>&1 | tail -5
    C="backend=torch model=gemma3-1b workload.num_requests=64 workload.concurrency=16 progress=false report.enabled=false"
    for g in false true false true; do
      timeout 90 python3 run_experiment.py $C backend.cuda_graphs=$g hydra.run.dir="$R/engine_graphs_$g" 2>&1 | tail -1
    done
    python3 - "$R" <<'PY'
import json, sys, glob
for d in sorted(glob.glob(sys.argv[1] + "/engine_graphs_*")):
    s = json.load(open(d + "/summary.json"))
    print(d.rsplit("/", 1)[1], f"{s['output_tokens_per_s']:.1f} tok/s  TPOT p50 {s['tpot_p50'] * 1e3:.2f} ms  "
          f"TTFT p50 {s['ttft_p50'] * 1e3:.1f} ms")
PY
    ;;
  pv-engine)
    # pv with whole decode steps profiled through the real engine and driver (grid engine_steps): the calibration
    # step the step probe points to; same ONLY / NO_REPEAT / PGRID as pv
    ENGINE_PGRID="--profile-grid engine_steps=true"
    ;&
  pv)
    # tables profiled in the validation's own process (--profile), then the selected 1-GPU entries (1 + REPEAT times, default 2; once with
    # NO_REPEAT=1). Two calls fit the 10-minute limit: ONLY='tiny-*,1b-c*-short,1b-c*-long,1b-*-static,1b-*-chunked,
    # 1b-c16-mixed-*,*-fp16', then ONLY='*gpu4*' NO_REPEAT=1 PGRID=stream (streamed steps are slow: the smaller
    # grid of profile_streamed). The sim side later on the CPU VM: validate --backends sim --profile --out DIR
    rep="--repeat ${REPEAT:-1}"; [ "${NO_REPEAT:-}" = 1 ] && rep=""
    [ "${PGRID:-}" = stream ] && PGRID=$STREAM_PGRID
    timeout 580 python3 -m experiments.validate --backends torch --skip-2gpu --out "$R/validation" --profile \
      --profile-grid reps=12 --profile-grid rounds=3 ${ENGINE_PGRID:-} ${PGRID:-} $rep ${ONLY:+--only "$ONLY"} \
      --torch-extra backend.cuda_graphs=true backend.prefill_graphs=true > "$R/validate_log.txt" 2>&1
    grep -E "^\[|runs ok|^profile" "$R/validate_log.txt" | tail -70; date
    ;;
  pv2)
    # Caution: the GPU-0 process builds a 1B model on the host while GPU 1's runs go on, so host-bound configs
    # (tiny-gemma3) share the CPU with it; prefer pv and pv-offload one after the other where time allows.
    # 2 GPUs in one call, two processes that each profile their own tables (validate --profile): GPU 1 the resident
    # 1-GPU entries; GPU 0 the GPU tests, then the offloaded entries (streamed layers inside the CUDA graphs). Both
    # twice (--repeat). On the CPU VM afterwards: validate --backends sim --profile --out <each folder>
    CUDA_VISIBLE_DEVICES=0 pv_offload 390 &
    CUDA_VISIBLE_DEVICES=1 timeout 575 python3 -m experiments.validate --backends torch --skip-2gpu --profile --repeat \
      --out "$R/validation" --only 'tiny-*,1b-c*-short,1b-c*-long,1b-*-static,1b-*-chunked,1b-c16-mixed-*,*-fp16' $G \
      > "$R/validate_log.txt" 2>&1 &
    wait
    tail -3 "$R/gpu_tests.txt"; grep -hE "runs ok|^profile" "$R/validate_offload_log.txt" "$R/validate_log.txt" | tail -20; date
    ;;
  pv-offload)
    # 1 GPU: pv2's GPU-0 half alone (the GPU tests, then the offloaded entries profiled and validated in one process)
    pv_offload 420
    tail -3 "$R/gpu_tests.txt"; grep -E "^\[|runs ok|^profile" "$R/validate_offload_log.txt" | tail -20; date
    ;;
  stream-graphs)
    # 1 GPU: the Gemma-3-1B shape under a 4 GiB budget (16 of 26 layers streamed from host memory), eager, then
    # with decode and prefill graphs capturing the streamed forward (benchmarks/results/gpu_stream_graphs/)
    C="backend=torch model=gemma3-1b backend.gpu_budget_gib=4.0 workload.num_requests=16 workload.concurrency=4
      workload.prompt.kind=fixed workload.prompt.value=128 workload.output.kind=fixed workload.output.value=32
      progress=false report.enabled=false"
    for g in false true; do
      timeout 80 python3 run_experiment.py $C backend.cuda_graphs=$g backend.prefill_graphs=$g \
        hydra.run.dir="$R/stream_graphs_$g" > "$R/log_$g.txt" 2>&1
      python3 -c "import json, sys; s = json.load(open(sys.argv[1])); print(sys.argv[2], round(s['output_tokens_per_s'], 1),
        'tok/s TPOT p50', round(s['tpot_p50'] * 1e3, 2), 'ms')" "$R/stream_graphs_$g/summary.json" "graphs=$g"
    done
    ;;
  probe)
    # 1 GPU: whole decode steps timed as the profiler times them and as a run drives them (benchmarks/step_probe.py)
    timeout 200 python3 benchmarks/step_probe.py --out "$R/step_probe" > "$R/log.txt" 2>&1
    tail -30 "$R/log.txt"; date
    ;;
  pp-validate)
    # 2 GPUs: the grid's pp2 entries once each on the real runtime (after pp-fidelity on the same lease)
    timeout 420 python3 -m experiments.validate --backends torch --only '*pp2' --out "$R/validation" \
      > "$R/validate_log.txt" 2>&1
    grep -E "^\[|runs ok" "$R/validate_log.txt"; date
    ;;
  pp-graphs)
    # pp-fidelity's tables with every stage decoding through its CUDA graphs (GraphStage), profiled with
    # --cuda-graphs (named *_pp2_graphs.csv); then pp-graphs-validate on the same lease. On 2 x H200 (lease K)
    # the pipeline profile of gemma3-1b reached admit_overhead after 200 s and tiny-gemma3's after 100 s, which
    # stopped both: hence the longer limits here, and the validation in a call of its own.
    mkdir -p "$R/calibration"
    for md in gemma3-1b:bf16:330 tiny-gemma3:fp32:180; do
      IFS=: read -r m d limit <<< "$md"
      out="$R/calibration/${m}_${d}_pp2_graphs"
      timeout $limit python3 -m wicore.cli profile --model $m --dtype $d --device cuda --pp 2 --cuda-graphs \
        --grid reps=12 --grid rounds=3 --out "$out.csv" > "$out.log.txt" 2>&1
      tail -1 "$out.log.txt"; date
    done
    ;;
  pp-graphs-validate)
    # the pp2 entries with stage graphs, each run twice (a pp2 run takes about 45 s, mostly start-up)
    timeout 560 python3 -m experiments.validate --backends torch --only '*pp2' --out "$R/validation" --repeat \
      --torch-extra backend.cuda_graphs=true > "$R/validate_log.txt" 2>&1
    grep -E "^\[|runs ok" "$R/validate_log.txt" | tail -12; date
    ;;
  pp-fidelity)
    # 2 GPUs: whole pipeline steps for the grid's pp2 entries, then those entries on the real runtime (same lease).
    # On the CPU VM afterwards: validate --backends sim --calibration-2gpu <merged pp2 table> --only '*pp2'
    mkdir -p "$R/calibration"
    for md in gemma3-1b:bf16:200 tiny-gemma3:fp32:100; do
      IFS=: read -r m d limit <<< "$md"
      out="$R/calibration/${m}_${d}_pp2"
      timeout $limit python3 -m wicore.cli profile --model $m --dtype $d --device cuda --pp 2 \
        --grid reps=12 --grid rounds=3 --out "$out.csv" > "$out.log.txt" 2>&1
      tail -1 "$out.log.txt"; date
    done
    timeout 200 python3 -m experiments.validate --backends torch --only '*pp2' --out "$R/validation" --repeat \
      > "$R/validate_log.txt" 2>&1
    grep -E "^\[|runs ok" "$R/validate_log.txt" | tail -12; date
    ;;
  pp)
    timeout 300 python3 benchmarks/gpu_pipeline.py --out "$R/gpu_pipeline" > "$R/pipeline_log.txt" 2>&1
    tail -30 "$R/pipeline_log.txt"; date
    timeout 100 python3 -m experiments.validate --backends torch --only '*pp2' --out "$R/validation" \
      > "$R/validate_log.txt" 2>&1
    tail -8 "$R/validate_log.txt"; date
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
tar -C "$OUT" -czf "$OUT/$stage.tgz" "$stage" && rm -rf "$R"
ls -la "$OUT"
