"""The ``wicore`` command: one entry for the project's tools.

    wicore run [hydra overrides]              = python run_experiment.py ...
    wicore checkpoint create --spec S --out D  random-weight checkpoint in Hugging Face layout
    wicore verify DIR [--sha256]              check a checkpoint directory
    wicore probe [--measure]                  describe this machine's devices
    wicore profile --model M --out T.csv [--device cuda] [--quick]   measure op costs: calibration table
    wicore merge-tables OUT.csv IN.csv ...    one calibration table from several (one per model and dtype)
    wicore report RUN_DIR                     (re)write a run's report.md and plots
    wicore sweep-summary SWEEP_DIR            (re)write a sweep's summary
    wicore validate --out DIR [options]       sim-vs-real validation grid + fidelity report
    wicore serve --checkpoint D | --backend sim [overrides]   OpenAI-compatible server
"""

from __future__ import annotations

import dataclasses
import json
import sys


def _probe(argv: list[str]) -> int:
    import argparse

    from wicore.devices import probe
    ap = argparse.ArgumentParser(prog="wicore probe")
    ap.add_argument("--measure", action="store_true", help="time host->device copies and disk reads")
    args = ap.parse_args(argv)
    print(json.dumps(dataclasses.asdict(probe(measure=args.measure)), indent=2))
    return 0


def _profile(argv: list[str]) -> int:
    from wicore.runtime.profiler import main as profile_main
    return profile_main(argv)


def _merge_tables(argv: list[str]) -> int:
    import argparse

    from sim.calibration import merge_tables
    from wicore.errors import ConfigError
    ap = argparse.ArgumentParser(prog="wicore merge-tables", description="concatenate calibration tables")
    ap.add_argument("out", help="table to write (+ .meta.json)")
    ap.add_argument("inputs", nargs="+", help="tables to merge (their run-shape meta must agree)")
    args = ap.parse_args(argv)
    try:
        print(merge_tables(args.inputs, args.out))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _report(argv: list[str]) -> int:
    from pathlib import Path

    from wicore.report import write_report
    for d in argv:
        print(write_report(Path(d)))
    return 0


def _sweep(argv: list[str]) -> int:
    from wicore.sweep import main as sweep_main
    sweep_main(argv)
    return 0


def _run(argv: list[str]) -> int:
    from experiments.main import main as hydra_main
    sys.argv = ["wicore run", *argv]
    hydra_main()
    return 0


def _checkpoint(argv: list[str]) -> int:
    from wicore.model.checkpoint import main as ckpt_main
    return ckpt_main(argv)


def _verify(argv: list[str]) -> int:
    from wicore.model.verify import main as verify_main
    return verify_main(argv)


def _validate(argv: list[str]) -> int:
    from experiments.validate import main as validate_main
    return validate_main(argv)


def _serve(argv: list[str]) -> int:
    from wicore.server.cli import main as serve_main
    return serve_main(argv)


COMMANDS = {"run": _run, "checkpoint": _checkpoint, "verify": _verify, "probe": _probe, "profile": _profile, "merge-tables": _merge_tables,
            "report": _report, "sweep-summary": _sweep, "serve": _serve,
            "validate": _validate}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print(__doc__)
        return 0 if not args or args[0] in ("-h", "--help") else 2
    return COMMANDS[args[0]](args[1:])


if __name__ == "__main__":
    sys.exit(main())
