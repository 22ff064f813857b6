"""GPU decode benchmark: copy bandwidth, CUDA-graph greedy decode of a Llama-3.1-8B-shaped model at
batch 1 and batch 32 (vs eager), and the same batch-32 job with Hugging Face transformers.

    python benchmarks/gpu_decode.py --out DIR [--steps 256] [--prompt-len 128] [--batch 32]

Sections (each timed after a warm-up, median of ``--repeats``; random weights and prompts):

1. copy: device-to-device copy of a 4 GiB bf16 tensor; bytes = read + write (2 x 4 GiB).
2. build: ``build_model(spec, "cuda", "bf16", seed=0)`` (random N(0, 0.02) weights, no disk) and a
   ``KVCache(max_slots=32, max_len=1024)`` in bf16. The yaml omits Llama-3.1's rope scaling (it does
   not change cost); the published ``llama3`` scaling (factor 8) is added so both models use it.
3. batch1: prefill a 128-token prompt into slot 0, then greedy decode with ``GraphedDecoder(B=1)``:
   256 generated tokens = 1 from the prefill + 255 decode steps (what HF generate does for
   ``max_new_tokens=256``). Also eager (no graph). Achieved bandwidth = bytes read per decode step /
   time per step, bytes = weights read (all layer weights, final norm, the full LM head, B embedding
   rows) + K and V of the full ``max_len`` buffer of every layer for every row (the mask-based
   attention multiplies over all of it); compared with the copy bandwidth, which counts read + write.
4. batch32: 32 rows (row 0 = the batch-1 prompt), one batched prefill, 255 decode steps.
5. hf: ``LlamaForCausalLM`` (default attention, default dynamic cache) with our weights copied in by
   name, ``generate(max_new_tokens=256, min_new_tokens=256, do_sample=False)`` on the same [32, 128]
   prompts; ratio ours / HF end to end (prefill + decode, identical work) and decode-only (HF decode
   time estimated as generate time - one prefill forward). Correctness on row 0: our batch-1 greedy
   tokens vs HF greedy (free running, first ``--check-tokens``), vs HF teacher-forced on our tokens,
   and the max |logit difference| of the prompt's last position.

Writes ``results.json`` and ``table.md`` to ``--out``; exits 0 with a message when no CUDA device
exists, 1 when a section failed (its error text is in results.json; the other sections still ran).
``--cpu-smoke`` runs every section on the CPU (development check of the script with a tiny ``--spec``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    Harness,
    fmt,
    free_memory,
    lookup,
    markdown_table,
    match_stats,
    sync,
    write_results,
)
from wicore.model.checkpoint import expected_tensors, hf_config, load_spec_file, param_name  # noqa: E402
from wicore.model.kv_cache import KVCache  # noqa: E402
from wicore.model.spec import ModelSpec  # noqa: E402
from wicore.model.transformer import Transformer, build_model, to_torch_dtype  # noqa: E402
from wicore.runtime.cuda_graph import GraphedDecoder  # noqa: E402

NO_GPU_MESSAGE = "gpu_decode: no CUDA device available (torch.cuda.is_available() is False); nothing to " \
                 "benchmark, exiting 0."
GB = 1e9  # bandwidths are in GB/s with GB = 1e9 bytes
GIB = 1 << 30
LLAMA31_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
BW_CONVENTION = ("copy bandwidth counts read + write bytes (2 x tensor size); decode bandwidth counts bytes "
                 "read per step (weights incl. full LM head + B embedding rows, plus K and V of the full "
                 "max_len cache buffer of every layer and row); writes (new K/V, logits) are not counted")
H = Harness("gpu_decode")
log = H.log
section = H.section


# ----- pure helpers (unit-tested) --------------------------------------------------------------
def copy_bytes(numel: int, element_size: int) -> int:
    """Bytes moved by ``dst.copy_(src)``: each element is read once and written once."""
    return 2 * numel * element_size


def decode_bytes_per_step(spec: ModelSpec, batch: int, kv_len: int, weight_bytes: float = 2.0,
                          kv_bytes: float = 2.0) -> dict[str, int]:
    """Bytes one decode step of ``batch`` rows reads from memory (see the module docstring).

    weights: every layer weight (projections, norms), the final norm, the whole LM head (the embedding
    matrix when tied) and ``batch`` gathered embedding rows; kv: K and V of ``kv_len`` positions for
    every layer and row (the eager masked attention reads the whole buffer, whatever the position).
    """
    h = spec.hidden_size
    params = spec.num_layers * spec.params_per_layer + h + spec.vocab_size * h + batch * h
    kv = 2 * spec.num_layers * batch * spec.num_kv_heads * kv_len * spec.head_dim * kv_bytes
    weights = int(params * weight_bytes)
    return {"weights": weights, "kv": int(kv), "total": weights + int(kv)}


def tokens_per_s(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


TABLE: list[tuple[str, str]] = [
    ("device", "meta.device"),
    ("copy bandwidth, GB/s (read+write)", "copy.bandwidth_GBps"),
    ("model params (B)", "build.params_billion"),
    ("weights read per decode step (GB)", "batch1.graph.bytes_per_step.weights_GB"),
    ("batch size / prompt tokens / generated tokens per row", "meta.shape"),
    ("B=1 prefill {T} tokens (ms)", "batch1.graph.prefill_ms"),
    ("B=1 decode mode (graph expected on CUDA)", "batch1.graph.mode"),
    ("B=1 graph: ms/token", "batch1.graph.ms_per_step"),
    ("B=1 graph: tokens/s (decode)", "batch1.graph.decode_tok_s"),
    ("B=1 graph: achieved bandwidth, GB/s (read)", "batch1.graph.achieved_GBps"),
    ("B=1 graph: achieved / copy bandwidth", "batch1.graph.fraction_of_copy_bw"),
    ("B=1 graph capture (s)", "batch1.graph.capture_s"),
    ("B=1 eager: ms/token", "batch1.eager.ms_per_step"),
    ("B=1 eager: tokens/s (decode)", "batch1.eager.decode_tok_s"),
    ("B=1 graph speed-up over eager", "batch1.graph_speedup"),
    ("B=1 graph tokens == eager tokens", "batch1.graph_eq_eager"),
    ("B=1 compile: ms/token", "batch1.compile.ms_per_step"),
    ("B={B} prefill {B}x{T} (ms)", "batch32.prefill_ms"),
    ("B={B} graph: ms/step", "batch32.ms_per_step"),
    ("B={B} graph: output tokens/s (decode)", "batch32.decode_tok_s"),
    ("B={B} graph: output tokens/s (prefill+decode)", "batch32.e2e_tok_s"),
    ("B={B} graph: achieved bandwidth, GB/s (read)", "batch32.achieved_GBps"),
    ("B={B} row 0 tokens == B=1 tokens", "batch32.row0_vs_b1"),
    ("HF B={B} generate (s)", "hf.generate_s"),
    ("HF B={B} output tokens/s (prefill+decode)", "hf.e2e_tok_s"),
    ("HF B={B} output tokens/s (decode, est.)", "hf.decode_tok_s_est"),
    ("ours / HF (prefill+decode)", "hf.ratio_e2e"),
    ("ours / HF (decode, est.)", "hf.ratio_decode_est"),
    ("HF attention implementation", "hf.attn_implementation"),
    ("row 0 free-running match ours B=1 vs HF B=1", "hf.check.free_running_b1"),
    ("row 0 teacher-forced match ours B=1 vs HF", "hf.check.teacher_forced"),
    ("row 0 prompt last-logit max |diff| ours vs HF", "hf.check.prompt_logits_max_abs_diff"),
    ("peak GPU memory allocated (GiB)", "meta.peak_mem_GiB"),
    ("total runtime (s)", "meta.total_s"),
]


def table_rows(results: dict[str, Any]) -> list[tuple[str, str]]:
    args = lookup(results, "meta.args")
    args = args if isinstance(args, dict) else {}
    subst = {"B": args.get("batch", 32), "T": args.get("prompt_len", 128)}
    rows = []
    for template, path in TABLE:
        label = template.format(**subst)
        value = lookup(results, path)
        if value is None:
            continue
        if isinstance(value, dict) and "matching" in value:
            value = f"{value['matching']}/{value['compared']} (common prefix {value['prefix']})"
        rows.append((label, fmt(value)))
    return rows


# ----- timing / plumbing -------------------------------------------------------------------------
def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes on the device (CUDA events around it; wall clock on the CPU)."""
    if device.type == "cuda":
        sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1
                ) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = [timed(fn, device) for _ in range(max(1, repeats))]
    return statistics.median(times), times


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ----- sections ------------------------------------------------------------------------------------
def bench_copy(out: dict[str, Any], device: torch.device, nbytes: int, repeats: int) -> None:
    numel = nbytes // 2
    src = torch.empty(numel, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t, times = median_time(lambda: dst.copy_(src), device, repeats, warmup=2)
    assert torch.equal(dst[:1024], src[:1024])
    moved = copy_bytes(numel, src.element_size())
    out.update({"tensor_bytes": numel * 2, "bytes_read_plus_write": moved, "median_s": t,
                "times_s": times, "bandwidth_GBps": moved / t / GB, "convention": "read + write"})
    log(f"copy {nbytes / GIB:.2f} GiB: {t * 1e3:.2f} ms -> {out['bandwidth_GBps']:.0f} GB/s (read+write)")


def make_spec(path: str, dtype: str) -> ModelSpec:
    spec = load_spec_file(path)
    extra = dict(spec.extra)
    if spec.family == "llama" and not extra.get("rope_scaling"):
        extra["rope_scaling"] = dict(LLAMA31_ROPE_SCALING)
    return replace(spec, dtype=dtype, extra=extra)


def run_decode(model: Transformer, cache: KVCache, spec: ModelSpec, prompts: torch.Tensor, steps: int,
               repeats: int, mode: str, copy_bw: float | None, teacher: torch.Tensor | None = None
               ) -> tuple[dict[str, Any], torch.Tensor]:
    """Prefill ``prompts`` [B, T] into slots 0..B-1, then ``steps - 1`` decode steps with GraphedDecoder
    (``mode``: graph / eager / compile). Returns (metrics, generated tokens [B, steps] on the CPU).
    ``teacher`` [B, steps] (another run's tokens): afterwards the same decoder is fed those tokens one by
    one and ``teacher_forced`` says how often its greedy next token is the teacher's next one."""
    device = prompts.device
    b, t = prompts.shape
    pos = torch.arange(t, device=device).expand(b, t)
    first: list[torch.Tensor] = []

    def prefill() -> None:
        logits = model(prompts, pos, cache, None, last_only=True)
        assert isinstance(logits, torch.Tensor)
        first[:] = [logits[:, -1].argmax(-1), logits[:, -1]]

    with torch.no_grad():
        prefill_s, _ = median_time(prefill, device, repeats)  # idempotent: rewrites the same K/V
    tok0, prompt_logits = first
    dec = GraphedDecoder(model, cache, b, use_graph=mode != "eager", use_compile=mode == "compile")
    start = torch.full((b,), t, dtype=torch.long, device=device)
    n = steps - 1
    gen: list[torch.Tensor] = []

    def decode() -> None:
        gen[:] = [dec.generate(tok0, start, n)]

    dec.generate(tok0, start, min(8, n))  # warm-up (rewrites the same K/V as the timed runs)
    decode_s, times = median_time(decode, device, repeats, warmup=0)
    tokens = torch.cat([tok0[:, None], gen[0]], dim=1).cpu()
    nbytes = decode_bytes_per_step(spec, b, cache.max_len, model.embed_tokens.weight.element_size(),
                                   cache.k[0].element_size())
    per_step = decode_s / n
    out: dict[str, Any] = {
        "mode": dec.mode, "batch": b, "prompt_len": t, "generated_tokens": steps, "decode_steps": n,
        "capture_s": dec.capture_s, "prefill_ms": prefill_s * 1e3, "decode_s": decode_s,
        "decode_times_s": times, "ms_per_step": per_step * 1e3,
        "decode_tok_s": tokens_per_s(b * n, decode_s),
        "e2e_tok_s": tokens_per_s(b * steps, prefill_s + decode_s),
        "bytes_per_step": {**nbytes, "weights_GB": nbytes["weights"] / GB, "kv_GB": nbytes["kv"] / GB},
        "achieved_GBps": nbytes["total"] / per_step / GB,
    }
    if copy_bw:
        out["fraction_of_copy_bw"] = out["achieved_GBps"] / copy_bw
    if teacher is not None:
        # logits of the first decode step (same input for every variant): compare them across variants
        dec.step(tok0, start)
        out["_first_step_logits"] = dec.logits[0].float().cpu().clone()
        ref = teacher.to(device)
        agree = torch.zeros((), dtype=torch.long, device=device)
        for i in range(ref.shape[1] - 1):
            agree += (dec.step(ref[:, i], start + i) == ref[:, i + 1]).sum()
        total = b * (ref.shape[1] - 1)
        out["teacher_forced"] = {"positions": total, "agree": int(agree), "fraction": int(agree) / total}
    out["_prompt_logits_row0"] = prompt_logits[0].float().cpu()
    log(f"B={b} {dec.mode}: prefill {prefill_s * 1e3:.1f} ms, {per_step * 1e3:.3f} ms/step, "
        f"{out['decode_tok_s']:.1f} tok/s decode, {out['achieved_GBps']:.0f} GB/s read")
    return out, tokens  # the decoder (and its graph memory pool) is freed with this frame


def build_hf(spec: ModelSpec, model: Transformer, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """HF CausalLM for ``spec`` on ``device`` in the model dtype, with our weights copied in by name."""
    import transformers

    cfg_dict = hf_config(spec, spec.dtype)
    config = transformers.AutoConfig.for_model(cfg_dict["model_type"], **{
        k: v for k, v in cfg_dict.items() if k not in ("model_type", "torch_dtype")})
    cls = getattr(transformers, cfg_dict["architectures"][0])
    dtype = to_torch_dtype(spec.dtype)
    with default_dtype(dtype), torch.device(device):
        hf = cls(config)
    hf.eval()  # no .to(dtype): that would round HF's fp32 RoPE buffers to the model dtype
    if next(hf.parameters()).dtype != dtype:
        raise RuntimeError(f"HF model built in {next(hf.parameters()).dtype}, expected {dtype}")
    hf_sd = hf.state_dict()
    ours = dict(model.named_parameters())
    expected = expected_tensors(spec)
    missing = [n for n in expected if n not in hf_sd]
    if missing:
        raise RuntimeError(f"HF model lacks {len(missing)} expected tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, shape in expected.items():
            if tuple(hf_sd[name].shape) != shape:
                raise RuntimeError(f"{name}: HF shape {tuple(hf_sd[name].shape)} != expected {shape}")
            hf_sd[name].copy_(ours[param_name(name)])
    extra = sorted(set(hf_sd) - set(expected) - ({"lm_head.weight"} if spec.tie_embeddings else set()))
    info = {"class": cls.__name__, "transformers": transformers.__version__,
            "attn_implementation": getattr(hf.config, "_attn_implementation", None),
            "params": sum(p.numel() for p in hf.parameters()), "uncopied_tensors": extra}
    if extra:
        raise RuntimeError(f"HF model has tensors we did not copy: {extra[:5]}")
    return hf, info


def bench_hf(out: dict[str, Any], spec: ModelSpec, model: Transformer, prompts: torch.Tensor, steps: int,
             repeats: int, check_tokens: int, ours_b1: torch.Tensor | None,
             ours_logits_row0: torch.Tensor | None, ours_b32: dict[str, Any]) -> None:
    device = prompts.device
    b, t = prompts.shape
    t0 = time.perf_counter()
    hf, info = build_hf(spec, model, device)
    out.update(info)
    out["build_s"] = time.perf_counter() - t0
    log(f"HF {info['class']} built ({info['params'] / 1e9:.2f} B params, attn={info['attn_implementation']}, "
        f"transformers {info['transformers']}) in {out['build_s']:.1f} s")
    eos = hf_config(spec)["eos_token_id"]
    mask = torch.ones_like(prompts)
    kw: dict[str, Any] = {"do_sample": False, "use_cache": True, "pad_token_id": eos}
    check: dict[str, Any] = {}
    out["check"] = check
    with torch.no_grad():
        hf.generate(prompts, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        if ours_b1 is not None:
            try:
                row0 = ours_b1[0].tolist()
                check["ours_b1_first"] = row0[:check_tokens]
                check["ours_b1_eos_positions"] = [i for i, x in enumerate(row0) if x == eos]
                # eos_token_id=None: plain greedy over the whole vocabulary, like ours (min_new_tokens would
                # mask EOS instead, and a row that picks EOS would diverge from ours for that reason alone)
                one = hf.generate(prompts[:1], attention_mask=mask[:1], max_new_tokens=check_tokens,
                                  eos_token_id=None, **kw)[0, t:].tolist()
                check["hf_b1_first"] = one
                check["free_running_b1"] = match_stats(row0, one, check_tokens)
                seq = torch.cat([prompts[0].cpu(), ours_b1[0, :check_tokens]]).to(device)[None]
                logits = hf(input_ids=seq).logits[0].float()
                forced = logits[t - 1:t - 1 + check_tokens].argmax(-1).tolist()
                check["teacher_forced"] = match_stats(row0, forced, check_tokens)
                if ours_logits_row0 is not None:
                    ref = logits[t - 1].cpu()
                    check["prompt_logits_max_abs_diff"] = float((ref - ours_logits_row0).abs().max())
                    check["prompt_logits_hf_absmax"] = float(ref.abs().max())
                    check["prompt_top1_equal"] = int(ref.argmax()) == int(ours_logits_row0.argmax())
                del logits
            except Exception as exc:  # noqa: BLE001 - keep the timing below
                check["error"] = f"{type(exc).__name__}: {exc}"
                log(f"HF correctness check FAILED: {check['error']}")
            log(f"row 0 check: {json.dumps({k: v for k, v in check.items() if isinstance(v, dict | float)})}")

        res: list[torch.Tensor] = []

        def generate() -> None:
            res[:] = [hf.generate(prompts, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                                  **kw)]

        gen_s, times = median_time(generate, device, repeats, warmup=0)
        hf_tokens = res[0][:, t:].cpu()
        if tuple(hf_tokens.shape) != (b, steps):
            raise RuntimeError(f"HF generated shape {tuple(hf_tokens.shape)}, expected {(b, steps)}")
        out.update({"generate_s": gen_s, "generate_times_s": times, "batch": b, "generated_tokens": steps,
                    "e2e_tok_s": tokens_per_s(b * steps, gen_s)})
        if ours_b32.get("e2e_tok_s"):
            out["ratio_e2e"] = ours_b32["e2e_tok_s"] / out["e2e_tok_s"]
        log(f"HF B={b} generate {steps} tokens: {gen_s:.2f} s -> {out['e2e_tok_s']:.1f} tok/s")
        check["hf_b32_row0_first"] = hf_tokens[0, :check_tokens].tolist()
        if ours_b1 is not None:
            check["vs_hf_b32_row0"] = match_stats(ours_b1[0].tolist(), hf_tokens[0].tolist(), check_tokens)
        if ours_b32.get("_tokens") is not None:
            check["ours_b32_vs_hf_b32_all_rows"] = match_stats(
                ours_b32["_tokens"].flatten().tolist(), hf_tokens.flatten().tolist(), b * steps)
        try:  # one prefill forward, to estimate HF's decode-only throughput
            pre_s, _ = median_time(lambda: hf(input_ids=prompts, attention_mask=mask, use_cache=True,
                                              logits_to_keep=1), device, repeats)
            out["prefill_ms_est"] = pre_s * 1e3
            out["decode_tok_s_est"] = tokens_per_s(b * (steps - 1), gen_s - pre_s)
            if ours_b32.get("decode_tok_s"):
                out["ratio_decode_est"] = ours_b32["decode_tok_s"] / out["decode_tok_s_est"]
        except Exception as exc:  # noqa: BLE001
            out["prefill_error"] = f"{type(exc).__name__}: {exc}"


# ----- main --------------------------------------------------------------------------------------
def write_outputs(results: dict[str, Any], out_dir: Path | None) -> None:
    rows = table_rows(results)
    text = markdown_table(rows)
    print("\n" + text, flush=True)
    print(f"Convention: {BW_CONVENTION}.", flush=True)
    if out_dir is None:
        return
    write_results(results, out_dir, text + f"\nConvention: {BW_CONVENTION}.\n")
    log(f"wrote {out_dir / 'results.json'} and {out_dir / 'table.md'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_decode")
    ap.add_argument("--spec", default=str(ROOT / "conf" / "model" / "llama3.1-8b.yaml"))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--steps", type=int, default=256, help="generated tokens per row (1 prefill + steps-1 decode)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-slots", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--copy-mib", type=float, default=4096.0, help="size of the copied tensor (MiB)")
    ap.add_argument("--copy-repeats", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of our prefill / decode loops")
    ap.add_argument("--hf-repeats", type=int, default=2, help="timed repeats of HF generate")
    ap.add_argument("--check-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time B=1 with torch.compile(reduce-overhead)")
    ap.add_argument("--cpu-smoke", action="store_true", help="dev: run every section on the CPU (tiny --spec)")
    args = ap.parse_args(argv)
    if args.steps < 2 or args.prompt_len < 1 or args.batch < 1:
        ap.error("--steps must be >= 2, --prompt-len and --batch >= 1")
    if args.batch > args.max_slots or args.prompt_len + args.steps > args.max_len:
        ap.error("need --batch <= --max-slots and --prompt-len + --steps <= --max-len")
    return args


def main(argv: list[str] | None = None) -> int:
    H.restart()
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps({"status": "skipped", "reason": NO_GPU_MESSAGE}) + "\n")
        return 0
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    results: dict[str, Any] = {"meta": {
        "torch": torch.__version__, "python": platform.python_version(), "args": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": f"{args.batch} / {args.prompt_len} / {args.steps}",
        "bandwidth_convention": BW_CONVENTION}}
    meta = results["meta"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update({"cuda": torch.version.cuda, "gpu_mem_GiB": props.total_memory / GIB,
                     "sm_count": props.multi_processor_count})
    log(f"device {meta['device']}, torch {torch.__version__}")
    model: Transformer | None = None
    cache: KVCache | None = None
    spec: ModelSpec | None = None
    ours_b1: torch.Tensor | None = None
    ours_logits_row0: torch.Tensor | None = None
    gen = torch.Generator().manual_seed(args.seed + 1)
    try:
        with section(results, "copy") as out:
            bench_copy(out, device, int(args.copy_mib * (1 << 20)), args.copy_repeats)
        free_memory(device)
        copy_bw = lookup(results, "copy.bandwidth_GBps")
        copy_bw = copy_bw if isinstance(copy_bw, float) else None

        with section(results, "build") as out:
            t0 = time.perf_counter()
            spec = make_spec(args.spec, args.dtype)
            model = build_model(spec, device, args.dtype, seed=args.seed)
            cache = KVCache(spec, args.max_slots, args.max_len, device, to_torch_dtype(args.dtype))
            sync(device)
            n_params = sum(p.numel() for p in model.parameters())
            out.update({"spec": spec.name, "dtype": args.dtype, "rope_scaling": spec.extra.get("rope_scaling"),
                        "params": n_params, "params_billion": n_params / 1e9,
                        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                        "kv_cache_bytes": cache.nbytes, "max_slots": args.max_slots, "max_len": args.max_len,
                        "build_s": time.perf_counter() - t0})
            log(f"built {spec.name}: {n_params / 1e9:.2f} B params, KV cache {cache.nbytes / GIB:.2f} GiB, "
                f"{out['build_s']:.1f} s")
        prompts = torch.randint(0, spec.vocab_size if spec else 2, (args.batch, args.prompt_len), generator=gen)

        with section(results, "batch1") as out:
            if model is None or cache is None or spec is None:
                raise RuntimeError("skipped: the model build failed")
            p1 = prompts[:1].to(device)
            res, ours_b1 = run_decode(model, cache, spec, p1, args.steps, args.repeats, "graph", copy_bw)
            ours_logits_row0 = res.pop("_prompt_logits_row0")
            out["graph"] = res
            if not args.skip_eager:
                res_e, eager_tokens = run_decode(model, cache, spec, p1, args.steps, args.repeats, "eager", copy_bw)
                res_e.pop("_prompt_logits_row0")
                out["eager"] = res_e
                out["graph_speedup"] = res_e["ms_per_step"] / res["ms_per_step"]
                out["graph_eq_eager"] = match_stats(ours_b1[0].tolist(), eager_tokens[0].tolist(), args.steps)
            if args.compile:
                try:
                    res_c, _ = run_decode(model, cache, spec, p1, args.steps, args.repeats, "compile", copy_bw)
                    res_c.pop("_prompt_logits_row0")
                    out["compile"] = res_c
                except Exception as exc:  # noqa: BLE001
                    out["compile"] = {"error": f"{type(exc).__name__}: {exc}"}
                    log(f"compile FAILED: {out['compile']['error']}")
        free_memory(device)

        with section(results, "batch32") as out:
            if model is None or cache is None or spec is None:
                raise RuntimeError("skipped: the model build failed")
            res, tokens = run_decode(model, cache, spec, prompts.to(device), args.steps, args.repeats, "graph",
                                     copy_bw)
            res.pop("_prompt_logits_row0")
            out.update(res)
            out["_tokens"] = tokens
            if ours_b1 is not None:
                out["row0_vs_b1"] = match_stats(tokens[0].tolist(), ours_b1[0].tolist(), args.steps)
        free_memory(device)

        if not args.skip_hf:
            with section(results, "hf") as out:
                if model is None or spec is None:
                    raise RuntimeError("skipped: the model build failed")
                if cache is not None:  # our KV cache is not needed any more: room for HF's
                    del cache
                    cache = None
                    free_memory(device)
                bench_hf(out, spec, model, prompts.to(device), args.steps, args.hf_repeats, args.check_tokens,
                         ours_b1, ours_logits_row0, results.get("batch32", {}))
            free_memory(device)  # the HF model is gone with bench_hf's frame
    finally:
        meta["total_s"] = H.elapsed()
        if device.type == "cuda":
            meta["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / GIB
        failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
        meta["failed_sections"] = failed
        write_outputs(results, args.out)
    if failed:
        log(f"sections failed: {failed} (errors in results.json)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
