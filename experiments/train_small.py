"""Train the project's small Gemma-3 model on the Python standard library, fit its MoR router and
write an HF-layout checkpoint with routing signals for the simulator.

    python -m experiments.train_small --out DIR --minutes 4 --device cuda      # preset "small"
    python -m experiments.train_small --out DIR --preset micro --steps 20 --device cpu   # smoke run

Reproduce: the corpus is the running Python's stdlib (``experiments/stdlib_corpus.py``: file
list, hash split, tokenizer); ``training_log.json`` records ``sys.version``, the file counts and
the held-out file names, the seed and every hyper-parameter. The same Python version, seed and
``--steps`` give the same run on the CPU; a time budget (``--minutes``) makes the cosine schedule
follow wall time, so GPU runs repeat up to timing.

Model (preset "small"): Gemma-3 architecture, 12 layers, hidden 512, 8 heads / 4 KV heads of 64,
GeGLU 1536, vocab 8192, context 512, sliding window 128 with every 6th layer global, q/k norm,
tied embeddings: 42.0 M parameters (37.8 M outside the embedding). Why: 12 layers give the exit
depths 2/4/6/8 the routing experiments need, and hidden 512 keeps every matmul large enough to
run efficiently on an H100. The corpus is small (Python 3.11: 721 train files, ~3.2 M tokens), so
the run is bounded by data, not compute: ``--epochs 8`` (default cap, ~25 M tokens, 1,540 steps of
32 x 512 tokens) ends before a 4-minute time budget at any plausible H100 throughput. More
passes over so little data mostly memorise it; ``training_log.json`` has the held-out loss every
10% of the run (``heldout_curve``) to show whether the cap is right for the data at hand.

Training: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices and the embedding, none on norms),
linear warm-up over the first 3% of the budget then cosine decay to 10%, gradient clipping 1.0,
bf16 autocast on CUDA (fp32 master weights), fp32 on the CPU, random windows of context length
sampled with a seeded generator. The budget is the first of ``--steps``, ``--minutes`` (training
loop wall time) and ``--epochs`` (tokens / train tokens) to run out; the schedule follows the
fraction used of it.

Auxiliary early-exit loss (LayerSkip / CALM style): the final norm + tied LM head are applied to the
hidden state after each exit depth ``k`` (``--exit-depths``, default L/6, L/3, L/2, 2L/3) and the
cross-entropy of those exits, weighted by ``k`` (deeper exits count more, as in CALM), is added
to the LM loss with weight ``--exit-loss-weight`` (default 0.2), on every 4th position to keep the
extra LM-head work small. It makes shallow exits usable without a separate head.

After training: the checkpoint is written (weights in ``--dtype``, config, tokenizer) and loaded
back; the router (one logistic regression per exit depth) is fitted on held-in windows
(``experiments/exit_signals.py``), ``signals.parquet`` is measured on held-out windows by
token-by-token decoding, and ``wicore verify`` and the server tokenizer loader are run on the result.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from experiments import exit_signals, stdlib_corpus
from wicore.errors import ConfigError
from wicore.model.checkpoint import load_checkpoint, write_model_checkpoint
from wicore.model.router_weights import save_router
from wicore.model.spec import ModelSpec
from wicore.model.transformer import ModelOutput, Transformer, build_model


@dataclass(frozen=True)
class Preset:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    context: int
    window: int
    pattern: int
    batch: int  # windows per step
    lr: float
    max_files: int | None  # None: the whole stdlib


PRESETS = {
    "small": Preset(12, 512, 8, 4, 64, 1536, 8192, 512, 128, 6, 32, 1.5e-3, None),
    # the tiny-gemma3 shape (conf/model/tiny-gemma3.yaml), for CPU smoke runs and tests
    "micro": Preset(6, 64, 4, 2, 16, 128, 512, 128, 32, 6, 8, 3e-3, 24),
}


def make_spec(p: Preset, name: str) -> ModelSpec:
    return ModelSpec(name=name, family="gemma3", num_layers=p.layers, hidden_size=p.hidden,
                     intermediate_size=p.intermediate, num_heads=p.heads, num_kv_heads=p.kv_heads,
                     head_dim=p.head_dim, vocab_size=p.vocab, max_context=p.context, sliding_window=p.window,
                     sliding_window_pattern=p.pattern, rope_theta=1e6, rope_local_base=1e4, tie_embeddings=True,
                     query_pre_attn_scalar=p.head_dim, dtype="fp32")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.train_small", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--minutes", type=float, default=None, help="training-loop wall-time budget")
    ap.add_argument("--steps", type=int, default=None, help="optimizer-step budget")
    ap.add_argument("--epochs", type=float, default=8.0, help="token budget in passes over the train split "
                    "(0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=None, help="windows per step (preset default)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (preset default)")
    ap.add_argument("--exit-depths", default=None, help="comma list, default L/6,L/3,L/2,2L/3")
    ap.add_argument("--exit-loss-weight", type=float, default=0.2)
    ap.add_argument("--max-files", type=int, default=-1, help="train files to use (-1: preset default; "
                    "0: all)")
    ap.add_argument("--heldout-bp", type=int, default=200, help="held-out share in basis points")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                    help="saved weight dtype (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training forward (CUDA)")
    ap.add_argument("--router-windows", type=int, default=128, help="held-in windows for the router fit")
    ap.add_argument("--router-steps", type=int, default=300)
    ap.add_argument("--signal-rows", type=int, default=32768, help="max rows of signals.parquet")
    ap.add_argument("--eval-windows", type=int, default=64, help="windows per loss evaluation")
    ap.add_argument("--log-every", type=int, default=25, help="steps between loss log entries")
    return ap.parse_args(argv)


class Budget:
    """Fraction of the training budget used: max over the step, time and token budgets."""

    def __init__(self, steps: int | None, seconds: float | None, tokens: float | None) -> None:
        if not (steps or seconds or tokens):
            raise ConfigError("train_small: no budget; give --steps, --minutes or --epochs > 0")
        self.steps, self.seconds, self.tokens = steps, seconds, tokens

    def progress(self, step: int, elapsed: float, tokens: int) -> float:
        parts = [step / self.steps if self.steps else 0.0, elapsed / self.seconds if self.seconds else 0.0,
                 tokens / self.tokens if self.tokens else 0.0]
        return max(parts)


def lr_at(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.1) -> float:
    if progress < warmup:
        return peak * (progress + 1e-3) / warmup
    f = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * f)))


def lm_losses(model: Any, ids: Tensor, depths: list[int], aux_stride: int = 4) -> tuple[Tensor, Tensor | None]:
    """(LM cross-entropy, depth-weighted exit cross-entropy or None) of windows ``ids`` [B, T + 1]."""
    x, y = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(x.shape[1], device=x.device).expand_as(x)
    out = model(x, pos, tap_layers=tuple(depths)) if depths else model(x, pos)
    logits = out.logits if isinstance(out, ModelOutput) else out
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    if not depths:
        return ce, None
    w = model.output_weight if isinstance(model, Transformer) else model._orig_mod.output_weight
    ys = y[:, ::aux_stride].reshape(-1)
    aux = sum(k * F.cross_entropy(F.linear(tap[:, ::aux_stride], w).float().reshape(-1, w.shape[0]), ys)
              for k, tap in zip(depths, out.taps)) / sum(depths)
    assert isinstance(aux, Tensor)
    return ce, aux


@torch.no_grad()
def evaluate(model: Transformer, windows: Tensor, depths: list[int], autocast: bool,
             batch: int = 16) -> dict[str, float]:
    """Mean next-token cross-entropy of ``windows`` [N, T] (targets inside each window), full depth
    and at each exit depth."""
    was = model.training
    model.eval()
    sums = {"loss": 0.0, **{f"exit_d{k}": 0.0 for k in depths}}
    count = 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i:i + batch]
        with torch.autocast(ids.device.type, torch.bfloat16, enabled=autocast):
            out = model(ids, torch.arange(ids.shape[1], device=ids.device).expand_as(ids),
                        return_hidden=True, tap_layers=tuple(depths))
        assert isinstance(out, ModelOutput)
        y = ids[:, 1:].reshape(-1)
        n = y.numel()
        sums["loss"] += float(F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), y)) * n
        for k, tap in zip(depths, out.taps):
            lk = F.linear(tap[:, :-1], model.output_weight).float()
            sums[f"exit_d{k}"] += float(F.cross_entropy(lk.reshape(-1, lk.shape[-1]), y)) * n
        count += n
    model.train(was)
    return {k: round(v / count, 5) for k, v in sums.items()}


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train(args: argparse.Namespace, spec: ModelSpec, preset: Preset, train_stream: Tensor,
          heldout: Tensor, depths: list[int], dev: torch.device) -> tuple[Transformer, dict[str, Any]]:
    torch.manual_seed(args.seed)
    model = build_model(spec, dev, torch.float32, seed=args.seed).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    peak = args.lr or preset.lr
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=peak, betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda")
    cuda = dev.type == "cuda"
    fwd: Any = model
    if args.compile and cuda:
        fwd = torch.compile(model)
    batch = args.batch or preset.batch
    budget = Budget(args.steps, args.minutes * 60 if args.minutes else None,
                    args.epochs * train_stream.numel() if args.epochs else None)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    stream = train_stream.to(dev)
    evals = max(1, heldout.shape[0] if args.eval_windows <= 0 else min(args.eval_windows, heldout.shape[0]))
    held_eval = heldout[:evals].to(dev)
    curve: list[dict[str, Any]] = []
    heldout_curve: list[dict[str, Any]] = []
    step, tokens, progress, next_eval = 0, 0, 0.0, 0.1
    t0 = time.perf_counter()
    last_loss = float("nan")
    while progress < 1.0:
        lr = lr_at(progress, peak)
        for g in opt.param_groups:
            g["lr"] = lr
        ids = stdlib_corpus.random_windows(stream, batch, spec.max_context + 1, gen)
        with torch.autocast(dev.type, torch.bfloat16, enabled=cuda):
            try:
                ce, aux = lm_losses(fwd, ids, depths if args.exit_loss_weight > 0 else [])
            except Exception as exc:  # noqa: BLE001 - torch.compile failures fall back to eager
                if fwd is model:
                    raise
                print(f"train_small: torch.compile failed ({type(exc).__name__}: {exc}); running eager")
                fwd = model
                ce, aux = lm_losses(fwd, ids, depths if args.exit_loss_weight > 0 else [])
        loss = ce if aux is None else ce + args.exit_loss_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += ids.shape[0] * (ids.shape[1] - 1)
        elapsed = time.perf_counter() - t0
        progress = budget.progress(step, elapsed, tokens)
        if step % args.log_every == 0 or step == 1 or progress >= 1.0:
            last_loss = float(ce.detach())  # the one host sync per log interval
            entry = {"step": step, "tokens": tokens, "epoch": round(tokens / train_stream.numel(), 3),
                     "loss": round(last_loss, 4), "exit_loss": None if aux is None else round(float(aux.detach()), 4),
                     "lr": lr, "elapsed_s": round(time.perf_counter() - t0, 2)}
            curve.append(entry)
            print(f"step {step:6d}  tokens {tokens / 1e6:7.2f}M  epoch {entry['epoch']:5.2f}  "
                  f"loss {last_loss:.4f}  lr {lr:.2e}  {tokens / max(elapsed, 1e-9):,.0f} tok/s", flush=True)
        if progress >= next_eval or progress >= 1.0:
            res = evaluate(model, held_eval, depths, cuda)
            heldout_curve.append({"step": step, "tokens": tokens, **res})
            print(f"  held-out loss {res['loss']:.4f}  " + "  ".join(
                f"d{k} {res[f'exit_d{k}']:.3f}" for k in depths), flush=True)
            next_eval = math.floor(progress * 10 + 1) / 10
    if cuda:
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    train_eval = stdlib_corpus.random_windows(stream, evals, spec.max_context, gen)
    final = {"heldout": evaluate(model, heldout.to(dev), depths, cuda),
             "train": evaluate(model, train_eval, depths, cuda)}
    log = {"steps": step, "tokens_seen": tokens, "epochs": round(tokens / train_stream.numel(), 3),
           "train_wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1), "peak_lr": peak,
           "batch_windows": batch, "final_train_loss": final["train"]["loss"],
           "final_heldout_loss": final["heldout"]["loss"], "final_exit_losses": final,
           "last_step_loss": last_loss, "compiled": fwd is not model, "loss_curve": curve,
           "heldout_curve": heldout_curve}
    return model.eval(), log


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    try:
        import pandas  # noqa: F401 - fail now, not after training
        import pyarrow  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as exc:
        print(f"error: train_small needs pandas, pyarrow and tokenizers ({exc})", file=sys.stderr)
        return 2
    preset = PRESETS[args.preset]
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available; use --device cpu", file=sys.stderr)
        return 2
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    save_dtype = args.dtype or ("bf16" if dev.type == "cuda" else "fp32")
    try:
        max_files = preset.max_files if args.max_files < 0 else (args.max_files or None)
        files = stdlib_corpus.list_files(heldout_bp=args.heldout_bp, max_files=max_files)
        spec = make_spec(preset, out.name or "stdlib-gemma3")
        depths = exit_signals.default_depths(spec.num_layers) if args.exit_depths is None else sorted(
            {int(d) for d in args.exit_depths.split(",")})
        if not all(1 <= d < spec.num_layers for d in depths):
            raise ConfigError(f"--exit-depths: {depths} must lie in 1..{spec.num_layers - 1}")
        train_texts = files.texts("train")
        tok = stdlib_corpus.train_tokenizer(train_texts, preset.vocab)
        train_stream = stdlib_corpus.encode_stream(tok, train_texts)
        held_stream = stdlib_corpus.encode_stream(tok, files.texts("heldout"))
        heldout = stdlib_corpus.consecutive_windows(held_stream, spec.max_context)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"corpus: {len(files.train)} train files ({train_stream.numel():,} tokens), {len(files.heldout)} "
          f"held-out ({held_stream.numel():,} tokens); model {spec.total_params / 1e6:.1f} M params; "
          f"exit depths {depths}; device {device_name(dev)}", flush=True)
    model, log = train(args, spec, preset, train_stream, heldout, depths, dev)

    write_model_checkpoint(model, out, save_dtype)
    stdlib_corpus.save_tokenizer(tok, out, spec.max_context)
    del model
    model, loaded = load_checkpoint(out, dev)
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)
    held_in = stdlib_corpus.random_windows(train_stream, args.router_windows, spec.max_context, gen).to(dev)
    x, y = exit_signals.router_features(model, held_in, depths)
    weight, bias, fit = exit_signals.fit_logistic(x, y, steps=args.router_steps)
    del x, y
    save_router(out, depths, weight, bias, loaded, {"fit": fit, "label": "shallow argmax != full argmax",
                                                    "data": f"{args.router_windows} random train windows"})
    from wicore.model.router_weights import load_router

    router = load_router(out, loaded, dev)
    n_sig = max(1, min(heldout.shape[0], -(-args.signal_rows // (spec.max_context - 1))))
    table = exit_signals.signal_table(model, router, heldout[:n_sig].to(dev), depths)
    write_signals(out / "signals.parquet", table, depths, args.signal_rows)

    log.update({"preset": args.preset, "preset_values": asdict(preset), "model": {
        "params": spec.total_params, "non_embedding_params": spec.total_params - spec.embedding_params,
        **{k: v for k, v in asdict(replace(spec, extra={})).items() if k != "extra"}},
        "saved_dtype": save_dtype, "seed": args.seed, "exit_depths": depths,
        "exit_loss_weight": args.exit_loss_weight, "device": device_name(dev), "torch": torch.__version__,
        "python": sys.version, "corpus": {**files.describe(), "train_tokens": train_stream.numel(),
                                          "heldout_tokens": held_stream.numel(), "tokenizer_vocab": preset.vocab,
                                          "heldout_bp": args.heldout_bp},
        "router_fit": fit, "router_heldout": exit_signals.router_eval(table, depths),
        "signals_rows": int(min(args.signal_rows, table["seq"].numel())),
        "checks": post_checks(out, spec.vocab_size), "total_wall_s": round(time.perf_counter() - t_start, 2)})
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"wrote {out}: held-out loss {log['final_heldout_loss']:.4f}, train loss {log['final_train_loss']:.4f}, "
          f"{log['steps']} steps, {log['train_wall_s']:.0f} s training, {log['total_wall_s']:.0f} s total")
    return 0 if log["checks"]["verify_ok"] and log["checks"]["tokenizer_ok"] else 1


def write_signals(path: Path, table: dict[str, Tensor], depths: list[int], max_rows: int) -> None:
    """``signals.parquet``; ``router`` is ``router_d<k>`` of the middle exit depth (the column the
    simulator's signal sampler reads), recorded in the file's metadata."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    mid = depths[len(depths) // 2]
    df = pd.DataFrame({k: v.numpy() for k, v in table.items()}).head(max_rows)
    df.insert(2, "router", df[f"router_d{mid}"])
    front = ["seq", "position", "confidence", "entropy", "router", "attention_peak"]
    df = df[front + [c for c in df.columns if c not in front]]
    tbl = pa.Table.from_pandas(df, preserve_index=False)
    meta = {**(tbl.schema.metadata or {}), b"wicore": json.dumps({"router_depth": mid, "depths": depths}).encode()}
    pq.write_table(tbl.replace_schema_metadata(meta), path)


def post_checks(out: Path, vocab: int) -> dict[str, Any]:
    """``wicore verify`` on the directory and a round trip through the server's tokenizer loader."""
    from wicore.cli import main as wicore_main
    from wicore.server.tokenizer import HFTokenizer, load_tokenizer

    verify_ok = wicore_main(["verify", str(out)]) == 0
    tok = load_tokenizer(vocab, checkpoint=out)
    sample = "def f(x):\n    return x + 1  # ünïcode\n"
    ids = tok.encode(sample)
    ok = isinstance(tok, HFTokenizer) and tok.decode(ids) == sample and tok.bos_id == 2 and 1 in tok.stop_ids
    return {"verify_ok": verify_ok, "tokenizer_ok": ok, "sample_tokens": len(ids)}


if __name__ == "__main__":
    sys.exit(main())
