"""``wicore serve``: start the OpenAI-compatible server.

    wicore serve --checkpoint ckpt/tiny [hydra overrides]            # real runtime (TorchBackend)
    wicore serve --backend sim hardware=t10x2 model=gemma3-27b        # digital twin, real-time timing

Hydra overrides are composed with the project's ``conf/`` exactly as
``run_experiment.py`` does (``scheduler.max_num_seqs=16``, ``scheduler.queue=priority``,
``backend.device=cpu`` ...). The workload group is not used by the server.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# the server brings its own requests: neutralise the workload checks of the builders
NEUTRAL = ["workload.prompt.kind=fixed", "workload.prompt.value=1", "workload.output.kind=fixed",
           "workload.output.value=1", "workload.num_requests=1", "progress=false", "report.enabled=false"]


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hcompose("config", overrides=list(overrides))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="wicore serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. hardware=t10x2 model=gemma3-27b")
    ap.add_argument("--checkpoint", help="Hugging Face-layout checkpoint directory (real runtime)")
    ap.add_argument("--backend", choices=["torch", "sim"], default=None,
                    help="torch (default with --checkpoint) or sim (the digital twin)")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    ap.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond the running batch; "
                    "more get HTTP 429")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (413 above)")
    ap.add_argument("--max-tokens-default", type=int, default=1024,
                    help="max_tokens of a chat request that gives none (capped by the context)")
    ap.add_argument("--request-timeout", type=float, default=600.0,
                    help="seconds before a request is aborted (a request's 'timeout' field overrides)")
    ap.add_argument("--served-model-name", default=None, help="model id in /v1/models")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: the checkpoint's, else bytes)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--log-level", default="warning")
    return ap


def _policy(cfg: Any) -> dict[str, Any]:
    sc, mc = cfg.scheduler, cfg.memory
    return {"queue": str(sc.queue), "batching": str(sc.batching), "preemption": str(sc.preemption),
            "max_num_seqs": int(sc.max_num_seqs), "max_batched_tokens": int(sc.max_batched_tokens),
            "memory": str(mc.get("manager", "static")), "replacement": str(mc.get("policy", "")) or None}


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """(EngineLoop, FastAPI app) from parsed arguments; the loop is not started."""
    from wicore.server.app import ServerConfig, create_app
    from wicore.server.engine_loop import EngineLoop
    from wicore.server.tokenizer import ByteTokenizer, load_tokenizer

    backend = args.backend or ("torch" if args.checkpoint else None)
    if backend is None:
        raise SystemExit("wicore serve: give --checkpoint DIR (real runtime) or --backend sim")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        logging.getLogger("wicore.server").warning("binding %s without --api-key", args.host)
    overrides = [*NEUTRAL, *args.overrides]
    if backend == "sim":
        from experiments.build import build_sim
        from wicore.server.sim_loop import PLACEHOLDER, SimExecutor

        cfg = compose(["backend=sim", *overrides])
        setup = build_sim(cfg)
        spec = setup.model
        tok = load_tokenizer(spec.vocab_size, None, args.tokenizer)
        executor: Any = SimExecutor(setup, ByteTokenizer(spec.vocab_size).encode(PLACEHOLDER))
        engine = setup.engines[0]
        context = spec.max_context
        name = args.served_model_name or spec.name
    else:
        import torch

        from experiments.run_torch import build_torch
        from wicore.server.engine_loop import TorchExecutor

        if args.threads:
            torch.set_num_threads(args.threads)
        extra = [f"checkpoint={Path(args.checkpoint).resolve()}"] if args.checkpoint else []
        # attention mass per KV page only feeds A2CR tiering, which the real runtime does not do yet
        cfg = compose(["backend=torch", "backend.measure_attention=false", *extra, *overrides])
        ts = build_torch(cfg)
        spec = ts.spec
        tok = load_tokenizer(spec.vocab_size, args.checkpoint, args.tokenizer)
        executor = TorchExecutor(ts.backend)
        engine = ts.engine
        context = min(spec.max_context, int(cfg.backend.max_len))
        name = args.served_model_name or (Path(args.checkpoint).name if args.checkpoint else spec.name)
    loop = EngineLoop(engine, executor, max_queue=args.max_queue)
    scfg = ServerConfig(model_name=name, context_len=context, vocab_size=spec.vocab_size, family=spec.family,
                        backend=backend, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                        default_max_tokens=args.max_tokens_default, request_timeout_s=args.request_timeout,
                        policy=_policy(cfg))
    return loop, create_app(loop, tok, scfg)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from wicore.errors import ConfigError

    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        loop, app = build(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from wicore.runtime.gc_freeze import frozen_gc

    with frozen_gc():  # serving: full collections skip the objects of start-up
        loop.start()
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=2)
        finally:
            loop.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
