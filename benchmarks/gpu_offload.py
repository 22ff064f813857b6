"""GPU offloading benchmark: batch-1 decode with most decoder layers streamed from host memory, ours vs
accelerate's CPU offloading under the same emulated GPU budget (issue 4, must-show 3).

    python benchmarks/gpu_offload.py --out DIR [--tokens 8] [--prompt-len 64]

Random weights, bf16, one prompt of ``--prompt-len`` tokens, greedy. Sections:

1. copy: host -> device copy of ``--copy-mib`` (1 GiB), pinned and pageable, median of 5 (synchronised).
2. ours_large_{bf16,int8}: Gemma-3-27B shape, 16 GiB GPU budget. ``StaticPlacement`` (probed machine, GPU
   memory replaced by the budget, tp=pp=1, default MemoryConfig) picks the streamed layers. Built on the
   meta device; resident tensors drawn on the GPU, streamed ones drawn on the GPU and copied into
   page-locked host blocks (``wicore.runtime.offload``); one seeded generator per tensor name, so every
   section sees the same values. Timed: a prefill (after a warm-up one), then ``--tokens`` decode steps
   (argmax on the device, no host sync in the loop). Reported: tokens/s, bytes moved per token, PCIe
   bandwidth = bytes / copy time (CUDA events on the copy stream) and its fraction of the pinned copy
   bandwidth, copy busy fraction, peak GPU memory during the run.
3. ours_small_{bf16,int8}, accelerate_small: Gemma-3-12B shape, 8 GiB budget (about the 27B@16GiB streamed
   fraction; its HF copy fits host RAM beside ours). HF ``Gemma3ForCausalLM`` (config from ``hf_config``)
   built on the CPU with the same tensors by name, ``infer_auto_device_map(max_memory={0: budget, "cpu":
   ...}, no_split_module_classes=[decoder layer])`` + ``dispatch_model``; same prompt, prefill + decode
   loop with the KV cache (``--baseline-tokens`` steps); ratio = ours / accelerate decode tokens/s.
4. accelerate_large, when the time left allows: the same baseline on 27B at 16 GiB (built alone: 54 GB).

Writes ``results.json`` and ``table.md`` to ``--out``; exits 0 with a message without CUDA, 1 when a section
failed (error in results.json, the others still ran). ``--cpu-smoke``: tiny spec on the CPU, no dispatch.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.harness import Harness, fmt, lookup, markdown_table, match_stats, sync, write_results  # noqa: E402
from benchmarks.harness import free_memory as free  # noqa: E402
from wicore.devices import probe  # noqa: E402
from wicore.hal import GIB  # noqa: E402
from wicore.memory.placement import MemoryConfig, StaticPlacement  # noqa: E402
from wicore.model.checkpoint import expected_tensors, hf_config, load_spec_file, param_name  # noqa: E402
from wicore.model.kv_cache import KVCache  # noqa: E402
from wicore.model.spec import ModelSpec  # noqa: E402
from wicore.model.transformer import Transformer, to_torch_dtype  # noqa: E402
from wicore.runtime.offload import offload_model  # noqa: E402

GB = 1e9
NO_GPU = "gpu_offload: no CUDA device available (torch.cuda.is_available() is False); nothing to benchmark, exiting 0."
H = Harness("gpu_offload")
log = H.log
section = H.section


# ----- pure helpers (unit-tested) ------------------------------------------------------------------
def plan(spec: ModelSpec, budget_gib: float, mem: MemoryConfig | None = None) -> StaticPlacement:
    """The placement of ``spec`` on this machine with the GPU memory replaced by ``budget_gib``."""
    hw = probe(measure=False)
    hw = replace(hw, gpu=replace(hw.gpu, memory_gib=budget_gib))
    return StaticPlacement(spec, hw, [0], 1, 1, mem or MemoryConfig())


def budget_for(spec: ModelSpec, resident: int, mem: MemoryConfig | None = None) -> float:
    """A GPU budget (GiB) under which ``resident`` decoder layers stay on the device (tiny specs)."""
    m = mem or MemoryConfig()
    fixed = (m.workspace_gib + m.kv_min_gib) * GIB + spec.embedding_bytes + m.stream_buffer_layers * spec.layer_bytes
    return (fixed + (resident + 0.5) * spec.layer_bytes) / m.gpu_memory_utilization / GIB


def make_fill(spec: ModelSpec, device: torch.device, seed: int = 0, std: float = 0.02
              ) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """Values by our parameter name: N(0, std), norms around their identity (Gemma 0, Llama 1); one
    generator per name, so every section (and the HF copy) sees the same tensors."""
    dtype = to_torch_dtype(spec.dtype)

    def fill(name: str, p: torch.Tensor) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        t = torch.randn(tuple(p.shape), generator=g, device=device, dtype=dtype).mul_(std)
        if name.endswith("norm.weight") and spec.family != "gemma3":
            t += 1.0
        return t
    return fill


def module_device(device_map: dict[str, Any], name: str) -> str:
    """Where an accelerate device map puts module ``name`` (its longest listed prefix)."""
    parts = name.split(".")
    for n in range(len(parts), -1, -1):
        key = ".".join(parts[:n])
        if key in device_map:
            return str(device_map[key])
    return "unmapped"


ROWS = [("device", "meta.device"), ("large model @ GPU budget", "meta.large"), ("small model @ GPU budget", "meta.small"),
        ("pinned H2D copy, GB/s (median of 5)", "copy.pinned_GBps"),
        ("pageable H2D copy, GB/s (median of 5)", "copy.pageable_GBps")]
for _sec in ("ours_large_bf16", "ours_large_int8", "accelerate_large", "ours_small_bf16", "ours_small_int8",
             "accelerate_small"):
    _label = _sec.replace("_", " ")
    ROWS += [(f"{_label}: layers streamed / total", f"{_sec}.layers"),
             (f"{_label}: decode tokens/s", f"{_sec}.decode_tok_s"),
             (f"{_label}: prefill s", f"{_sec}.prefill_s")]
    if _sec.startswith("ours"):
        ROWS += [(f"{_label}: bytes moved per token (GB)", f"{_sec}.bytes_per_token_GB"),
                 (f"{_label}: achieved PCIe GB/s (bytes / copy time)", f"{_sec}.achieved_GBps"),
                 (f"{_label}: fraction of pinned copy bandwidth", f"{_sec}.fraction_of_pinned"),
                 (f"{_label}: copy busy fraction of decode time", f"{_sec}.copy_busy_fraction"),
                 (f"{_label}: peak GPU memory GiB", f"{_sec}.peak_gpu_GiB")]
    else:
        ROWS += [(f"{_label}: ours bf16 / accelerate (decode)", f"{_sec}.ratio_bf16"),
                 (f"{_label}: ours int8 / accelerate (decode)", f"{_sec}.ratio_int8"),
                 (f"{_label}: greedy tokens ours vs HF", f"{_sec}.tokens_vs_ours"),
                 (f"{_label}: prefill last-logit max |diff| ours vs HF", f"{_sec}.prefill_logit_max_diff")]
ROWS += [("total runtime (s)", "meta.total_s")]


def markdown(results: dict[str, Any]) -> str:
    rows = [(k, fmt(v)) for k, p in ROWS if (v := lookup(results, p)) is not None]
    return markdown_table(rows)


# ----- plumbing ------------------------------------------------------------------------------------
def bench_copy(out: dict[str, Any], device: torch.device, nbytes: int, repeats: int = 5) -> None:
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for pinned in (True, False):
        src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pinned and device.type == "cuda")
        times = []
        for _ in range(repeats + 1):
            sync(device)
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=pinned)
            sync(device)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times[1:])
        out["pinned_GBps" if pinned else "pageable_GBps"] = nbytes / t / GB
        del src
    log(f"H2D {nbytes / GIB:g} GiB: pinned {out['pinned_GBps']:.1f} GB/s, pageable {out['pageable_GBps']:.1f} GB/s")


def decode(forward: Callable[[torch.Tensor, int | None], torch.Tensor], prompt: torch.Tensor, n: int,
           device: torch.device, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Warm-up prefill, timed prefill, ``n`` timed greedy decode steps (argmax on the device, no sync).
    ``forward(ids, step)``: step None = prefill of ``ids`` from position 0, else decode step ``step``."""
    forward(prompt, None)  # warm-up (kernels, workspaces); the next prefill rewrites the same KV
    sync(device)
    t0 = time.perf_counter()
    logits = forward(prompt, None)
    sync(device)
    prefill_s = time.perf_counter() - t0
    first = logits[0, -1].float().cpu()
    tok = logits[:, -1].argmax(-1)
    toks = [tok]
    if on_start is not None:
        on_start()
    t0 = time.perf_counter()
    for i in range(n):
        tok = forward(tok.view(1, 1), i)[:, -1].argmax(-1)
        toks.append(tok)
    sync(device)
    decode_s = time.perf_counter() - t0
    return {"prefill_s": prefill_s, "decode_s": decode_s, "decode_tok_s": n / decode_s,
            "ms_per_token": decode_s / n * 1e3, "tokens": torch.cat(toks).tolist(), "_first_logits": first}


def prompt_for(spec: ModelSpec, length: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, spec.vocab_size, (1, length), generator=g).to(device)


def run_ours(out: dict[str, Any], spec: ModelSpec, budget_gib: float, host_format: str, device: torch.device,
             prompt: torch.Tensor, n: int, seed: int, pin: str, pinned_bw: float | None) -> None:
    placement = plan(spec, budget_gib)
    streamed = [layer for layer, _ in placement.placements[0].streamed]
    out.update({"spec": spec.name, "budget_GiB": budget_gib, "host_format": host_format,
                "num_streamed": len(streamed), "layers": f"{len(streamed)} / {spec.num_layers}",
                "streamed_bytes": placement.placements[0].streamed_bytes, "placement": placement.describe(),
                "placement_tier": placement.offload_tier})
    log(f"{spec.name} @ {budget_gib:g} GiB: {len(streamed)} of {spec.num_layers} layers stream ({host_format})")
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(spec)
    model = model.to(dtype=to_torch_dtype(spec.dtype))
    st = offload_model(model, streamed, device, host_format, fill=make_fill(spec, device, seed), pin=pin)
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)  # the peak below is the run's, not the setup's
    out["setup_s"] = time.perf_counter() - t0
    out["pinned_with"] = st.pinned_with
    log(f"materialised in {out['setup_s']:.1f} s (host blocks: {st.pinned_with}, "
        f"{sum(st.layer_bytes) / GIB:.1f} GiB)")
    t = prompt.shape[1]
    cache = KVCache(spec, 1, t + n + 1, device, to_torch_dtype(spec.dtype))
    pos = torch.arange(t, t + n, device=device)
    if device.type == "cuda":
        out["gpu_after_setup_GiB"] = torch.cuda.memory_allocated(device) / GIB

    def forward(ids: torch.Tensor, step: int | None) -> torch.Tensor:
        p = torch.arange(t, device=device)[None] if step is None else pos[step].view(1, 1)
        out = model(ids, p, cache, last_only=True)
        assert isinstance(out, torch.Tensor)
        return out

    def on_start() -> None:  # decode counters only (the copies prefetched at the end of the prefill are done)
        st.synchronize()
        st.reset_counters()

    with torch.inference_mode():
        res = decode(forward, prompt, n, device, on_start)
    stats = st.stats()
    first = res.pop("_first_logits")
    out.update(res)
    out["_first_logits"] = first
    copy_s = stats["copy_s"]
    out.update({"bytes_per_token": st.bytes_per_forward, "bytes_per_token_GB": st.bytes_per_forward / GB,
                "stream": stats, "achieved_GBps": stats["achieved_GBps"],
                "effective_GBps": st.bytes_per_forward * res["decode_tok_s"] / GB,
                "copy_busy_fraction": copy_s / res["decode_s"] if res["decode_s"] else float("nan")})
    if pinned_bw:
        out["fraction_of_pinned"] = stats["achieved_GBps"] / pinned_bw
    if device.type == "cuda":
        out["peak_gpu_GiB"] = torch.cuda.max_memory_allocated(device) / GIB
    log(f"{res['decode_tok_s']:.3f} tok/s ({res['ms_per_token']:.0f} ms/token), "
        f"{st.bytes_per_forward / GB:.2f} GB/token, PCIe {stats['achieved_GBps']:.1f} GB/s, "
        f"prefill {res['prefill_s']:.2f} s")
    st.close()


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Skip HF's random init (the tensors are overwritten): minutes for 12B+ on the CPU otherwise."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]
        except ImportError:
            no_init_weights = contextlib.nullcontext  # type: ignore[assignment]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with no_init_weights():
            yield
    finally:
        torch.set_default_dtype(old)


def run_accelerate(out: dict[str, Any], spec: ModelSpec, budget_gib: float, device: torch.device,
                   prompt: torch.Tensor, n: int, seed: int, ours: dict[str, dict[str, Any]]) -> None:
    import transformers

    t0 = time.perf_counter()
    cfg = hf_config(spec, spec.dtype)
    config = transformers.AutoConfig.for_model(cfg["model_type"], **{
        k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype")})
    with no_init():
        hf = getattr(transformers, cfg["architectures"][0])(config)
    hf.eval()
    fill, sd = make_fill(spec, device, seed), hf.state_dict()
    with torch.no_grad():
        for name, shape in expected_tensors(spec).items():
            sd[name].copy_(fill(param_name(name), torch.empty(shape, device="meta")))
    del sd
    hf.tie_weights()  # no_init_weights also skips the tying done in init_weights
    if spec.tie_embeddings and hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("HF lm_head is not tied to embed_tokens after tie_weights()")
    out.update({"build_s": time.perf_counter() - t0, "transformers": transformers.__version__})
    log(f"HF {type(hf).__name__} built on the CPU in {out['build_s']:.1f} s")
    layer_cls = type(hf.model.layers[0]).__name__
    if device.type == "cuda":
        import accelerate

        dmap = accelerate.infer_auto_device_map(hf, max_memory={0: f"{budget_gib}GiB", "cpu": "110GiB"},
                                                no_split_module_classes=[layer_cls], dtype=torch.bfloat16)
        hf = accelerate.dispatch_model(hf, device_map=dmap, skip_keys=getattr(hf, "_skip_keys_device_placement", None))
        n_cpu = sum(1 for i in range(spec.num_layers) if module_device(dmap, f"model.layers.{i}") in ("cpu", "disk"))
        out.update({"accelerate": accelerate.__version__, "layers": f"{n_cpu} / {spec.num_layers}",
                    "device_map_cpu_entries": len([v for v in dmap.values() if str(v) == "cpu"]),
                    "device_map": {k: str(v) for k, v in dmap.items()}})
        log(f"accelerate device map: {n_cpu} of {spec.num_layers} layers offloaded to the CPU")
    else:
        out["layers"] = "not dispatched (cpu smoke)"
    out["attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
    state: dict[str, Any] = {}

    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def forward(ids: torch.Tensor, step: int | None) -> torch.Tensor:
        kv = {cache_kw: None if step is None else state["past"]}
        r = hf(input_ids=ids, use_cache=True, logits_to_keep=1, **kv)
        state["past"] = r.get("cache") if r.get("cache") is not None else r.get("past_key_values")
        return r.logits

    with torch.no_grad():
        res = decode(forward, prompt, n, device)
    first = res.pop("_first_logits")
    out.update(res)
    for fmt_name in ("bf16", "int8"):
        o = ours.get(fmt_name, {})
        if o.get("decode_tok_s"):
            out[f"ratio_{fmt_name}"] = o["decode_tok_s"] / res["decode_tok_s"]
    o = ours.get("bf16", {})
    if o.get("tokens"):
        out["tokens_vs_ours"] = match_stats(o["tokens"], res["tokens"])
    if o.get("_first_logits") is not None:
        out["prefill_logit_max_diff"] = float((o["_first_logits"] - first).abs().max())
        out["prefill_logit_absmax"] = float(first.abs().max())
    log(f"accelerate: {res['decode_tok_s']:.3f} tok/s, prefill {res['prefill_s']:.2f} s; "
        f"ratio bf16 {out.get('ratio_bf16', float('nan')):.2f}x, int8 {out.get('ratio_int8', float('nan')):.2f}x")


# ----- main ----------------------------------------------------------------------------------------
def write(results: dict[str, Any], out_dir: Path | None) -> None:
    text = markdown(results)
    print("\n" + text, flush=True)
    if out_dir is None:
        return
    write_results(results, out_dir, text)
    log(f"wrote {out_dir / 'results.json'} and {out_dir / 'table.md'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_offload")
    ap.add_argument("--large", default=str(ROOT / "conf" / "model" / "gemma3-27b.yaml"))
    ap.add_argument("--small", default=str(ROOT / "conf" / "model" / "gemma3-12b.yaml"))
    ap.add_argument("--large-budget-gib", type=float, default=16.0)
    ap.add_argument("--small-budget-gib", type=float, default=8.0)
    ap.add_argument("--tokens", type=int, default=8, help="decode steps timed (after the prefill), ours")
    ap.add_argument("--baseline-tokens", type=int, default=4, help="decode steps timed, accelerate")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copy-mib", type=int, default=1024, help="size of the H2D copy bandwidth test")
    ap.add_argument("--pin", default="auto", choices=["auto", "register", "pin_memory"])
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-accelerate", action="store_true")
    ap.add_argument("--max-s", type=float, default=510.0, help="skip accelerate_large if it would end later")
    ap.add_argument("--cpu-smoke", action="store_true", help="dev: tiny spec on the CPU, no accelerate dispatch")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    H.restart()
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_GPU, flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"status": "skipped", "reason": NO_GPU}) + "\n")
        return 0
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", torch.cuda.current_device())
    if args.cpu_smoke:
        tiny = load_spec_file(ROOT / "conf" / "model" / "tiny-gemma3.yaml").with_dtype("bf16")
        large = small = tiny
        args.large_budget_gib, args.small_budget_gib = budget_for(tiny, 2), budget_for(tiny, 1)
        args.tokens, args.prompt_len, args.copy_mib = 4, 12, 64
    else:
        large, small = load_spec_file(args.large), load_spec_file(args.small)
    results: dict[str, Any] = {"meta": {
        "torch": torch.__version__, "python": platform.python_version(), "args": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}}
    meta = results["meta"]
    meta["large"] = f"{large.name} @ {args.large_budget_gib:.4g} GiB"
    meta["small"] = f"{small.name} @ {args.small_budget_gib:.4g} GiB"
    if device.type == "cuda":
        meta.update({"cuda": torch.version.cuda, "gpu_mem_GiB": torch.cuda.get_device_properties(device).total_memory / GIB})
    log(f"device {meta['device']}, torch {torch.__version__}")
    ours: dict[str, dict[str, dict[str, Any]]] = {"large": {}, "small": {}}
    try:
        with section(results, "copy") as out:
            bench_copy(out, device, int(args.copy_mib) << 20)
        pinned = lookup(results, "copy.pinned_GBps")
        pinned = pinned if isinstance(pinned, float) else None
        todo = [("large", large, args.large_budget_gib, "bf16"), ("large", large, args.large_budget_gib, "int8"),
                ("small", small, args.small_budget_gib, "bf16"), ("small", small, args.small_budget_gib, "int8")]
        for size, spec, budget, hfmt in todo:
            if size == "large" and args.skip_large:
                continue
            with section(results, f"ours_{size}_{hfmt}") as out:
                ours[size][hfmt] = out
                run_ours(out, spec, budget, hfmt, device, prompt_for(spec, args.prompt_len, args.seed, device),
                         args.tokens, args.seed, args.pin, pinned)
            free(device)
        jobs = [("small", small, args.small_budget_gib)]
        jobs += [] if args.skip_large or args.cpu_smoke else [("large", large, args.large_budget_gib)]
        for size, spec, budget in [] if args.skip_accelerate else jobs:
            prev = lookup(results, "accelerate_small.section_s")
            if size == "large" and isinstance(prev, float):
                est = 2.4 * prev + 60  # 27B moves ~2.4x the bytes of 12B per token, + building 54 GB
                if H.elapsed() + est > args.max_s:
                    results["accelerate_large"] = {"skipped": f"estimated {est:.0f} s would exceed --max-s"}
                    log(results["accelerate_large"]["skipped"])
                    continue
            with section(results, f"accelerate_{size}") as out:
                run_accelerate(out, spec, budget, device, prompt_for(spec, args.prompt_len, args.seed, device),
                               args.baseline_tokens, args.seed, ours[size])
            free(device)
    finally:
        meta["total_s"] = H.elapsed()
        failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
        meta["failed_sections"] = failed
        write(results, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
