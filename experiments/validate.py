"""Validation grid: the same configs on backend=torch and backend=sim, then the fidelity report.

    python -m experiments.validate --backends torch,sim --out DIR [--only NAME,...] [--skip-2gpu]
        [--hardware h100] [--hardware-2gpu h100x2] [--calibration CSV] [--calibration-2gpu CSV]
        [--profile [--profile-grid FIELD=VALUES ...]] [--extra OVERRIDE ...] [--torch-extra OVERRIDE ...]
        [--repeat [N]]
    python -m experiments.validate --report-only DIR
    python -m experiments.validate --combine DIR [DIR ...] --out OUT

Each grid entry (``conf/validation/grid.yaml``) runs on each backend in this process
(Hydra's compose API, then ``run_sim`` / ``run_torch``) into ``DIR/<config>/<backend>/``: the
usual result folder plus ``.hydra/overrides.yaml`` and ``validation.json`` (what ran, wall
time, and on the torch side the probed device and the allocator's peak memory per GPU). A
config that fails writes ``error.txt`` there and the others go on. Then
``DIR/fidelity.md`` (+ csv, plots) compares every config that has both runs. With ``--repeat``
the torch side runs twice (``DIR/<config>/torch_repeat/``) and the report states how far the
real runtime's second run lands from its first: the noise floor of any comparison. ``--repeat N``
runs it N more times (``torch_repeat``, ``torch_repeat2``, ...); from three runs on, the run of median
output throughput stands for the real side (``wicore.fidelity.median_of_runs``).

The torch side needs the GPU; the sim side can be re-run later on any machine over the same
DIR (``--backends sim``): ``--hardware`` names the profile of the GPU machine the torch side
ran on. Every check (grid file, names, overrides, calibration table) runs before the first run.
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import json
import re
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from wicore.errors import ConfigError
from wicore.results import write_overrides

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
GRID = CONF / "validation" / "grid.yaml"
BACKENDS = ("torch", "sim")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ENTRY_KEYS = {"name", "overrides", "lengths", "gpus", "gpu_budget_gib"}


@dataclass(frozen=True)
class GridConfig:
    """One grid entry: ``overrides`` = the grid's ``common`` + the entry's ``lengths`` preset + its own."""

    name: str
    overrides: tuple[str, ...]
    gpus: int = 1
    gpu_budget_gib: float | None = None


@dataclass(frozen=True)
class Options:
    hardware: str = "h100"  # sim profile of the GPU machine (1-GPU entries)
    hardware_2gpu: str | None = None  # 2-GPU entries; None: f"{hardware}x2"
    calibration: str | None = None  # backend.calibration table for the sim side
    extra: tuple[str, ...] = ()  # appended to every run on both backends
    warmup: bool = True  # one throw-away torch run first (CUDA context, kernels, allocator)
    torch_extra: tuple[str, ...] = ()  # appended to the torch side only (e.g. backend.cuda_graphs=true)
    repeat: int = 0  # torch runs after the first (<config>/torch_repeat/, torch_repeat2/, ...): measurement noise
    calibration_2gpu: str | None = None  # table of the 2-GPU entries (`wicore profile --pp 2`); None: roofline
    profile: bool = False  # profile each 1-GPU entry's run shape in this process first (validate_profile.py)
    profile_grid: tuple[str, ...] = ()  # FIELD=VALUES overrides of that profile's grid
    entry_tables: tuple[tuple[str, str], ...] = ()  # (entry name, table) from --profile

    def table(self, entry: GridConfig) -> str | None:
        """The sim side's calibration table for ``entry`` (a 1-GPU table never costs a pipeline)."""
        own = dict(self.entry_tables).get(entry.name)
        if own:
            return own
        return self.calibration if entry.gpus == 1 else self.calibration_2gpu

    @property
    def hw2(self) -> str:
        return self.hardware_2gpu or f"{self.hardware}x2"


@dataclass
class Outcome:
    config: str
    backend: str
    status: str  # ok | failed
    error: str = ""
    wall_s: float = 0.0


def load_grid(path: Path = GRID) -> list[GridConfig]:
    """Read and check the grid file; a bad entry is a ConfigError naming it."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--grid: cannot read {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("configs"), list):
        raise ConfigError(f"--grid: {path} must hold a mapping with a `configs` list")
    lengths = data.get("lengths") or {}
    common = data.get("common") or []
    if not isinstance(common, list) or not all(isinstance(o, str) and "=" in o for o in common):
        raise ConfigError(f"--grid: {path}: `common` must be a list of key=value strings")
    out: list[GridConfig] = []
    seen: set[str] = set()
    for i, item in enumerate(data["configs"]):
        where = f"{path}: configs[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: must be a mapping with name and overrides")
        unknown = sorted(set(item) - ENTRY_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(ENTRY_KEYS)}")
        name = str(item.get("name", ""))
        if not NAME.match(name) or name in seen:
            raise ConfigError(f"{where}: name '{name}' must be unique and a plain folder name "
                              "(letters, digits, . _ -)")
        seen.add(name)
        ovr = item.get("overrides") or []
        if not isinstance(ovr, list) or not all(isinstance(o, str) and "=" in o for o in ovr):
            raise ConfigError(f"{where} ({name}): overrides must be a list of key=value strings")
        pre: list[str] = []
        if item.get("lengths") is not None:
            if item["lengths"] not in lengths:
                raise ConfigError(f"{where} ({name}): lengths '{item['lengths']}' is not one of {sorted(lengths)}")
            pre = [str(o) for o in lengths[item["lengths"]]]
        gpus = int(item.get("gpus", 1))
        if gpus not in (1, 2):
            raise ConfigError(f"{where} ({name}): gpus must be 1 or 2, got {gpus}")
        budget = item.get("gpu_budget_gib")
        if budget is not None and float(budget) <= 0:
            raise ConfigError(f"{where} ({name}): gpu_budget_gib must be > 0 or absent, got {budget}")
        out.append(GridConfig(name, (*common, *pre, *ovr), gpus, float(budget) if budget is not None else None))
    return out


def select(grid: list[GridConfig], only: list[str] | None = None, skip_2gpu: bool = False) -> list[GridConfig]:
    """Entries matching any of ``only`` (names or shell patterns), minus 2-GPU ones if asked."""
    if only:
        for pat in only:
            if not any(fnmatch.fnmatchcase(g.name, pat) for g in grid):
                raise ConfigError(f"--only: '{pat}' matches no grid config; names: {', '.join(g.name for g in grid)}")
        grid = [g for g in grid if any(fnmatch.fnmatchcase(g.name, p) for p in only)]
    if skip_2gpu:
        grid = [g for g in grid if g.gpus == 1]
    return grid


def run_overrides(entry: GridConfig, backend: str, opts: Options) -> list[str]:
    """The full override list of one entry on one backend (see grid.yaml)."""
    side: list[str]
    if backend == "sim":
        side = [f"hardware={opts.hardware if entry.gpus == 1 else opts.hw2}"]
        if entry.gpus == 2:
            side.append("parallel=pp")
        if entry.gpu_budget_gib is not None:
            side.append(f"hardware.gpu.memory_gib={entry.gpu_budget_gib}")
        if opts.table(entry):
            side.append(f"backend.calibration={opts.table(entry)}")
    elif backend == "torch":
        side = ["backend=torch"]
        if entry.gpus == 2:
            side.append("parallel=pp")
        if entry.gpu_budget_gib is not None:
            side.append(f"backend.gpu_budget_gib={entry.gpu_budget_gib}")
        side += opts.torch_extra
    else:
        raise ConfigError(f"--backends: unknown backend '{backend}', use {', '.join(BACKENDS)}")
    return ["experiment=validation", *entry.overrides, *side, *opts.extra]


def compose(overrides: list[str]) -> DictConfig:
    """One config through Hydra's compose API (a GlobalHydra context must be open: see ``hydra_context``)."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(str(e).splitlines()[0]) from None


class Composer:
    """``compose`` for many override lists that share a few config-group choices.

    Hydra composes in two parts: the defaults list (group choices such as ``model=...``, the
    slow part: every YAML file is read and merged) and then the value overrides, applied to the
    composed config with ``ConfigLoaderImpl._apply_overrides_to_config``. This keeps the first
    part per distinct sequence of group overrides and runs only the second part per call, with
    the same function Hydra uses; lists with ``hydra`` overrides go through ``compose``.
    """

    def __init__(self) -> None:
        self._base: dict[tuple[str, ...], DictConfig] = {}

    def __call__(self, overrides: list[str]) -> DictConfig:
        import copy

        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            parsed = OverridesParser.create().parse_overrides(overrides)
        except HydraException as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        groups = [o for o in parsed if (CONF / o.key_or_group).is_dir()]
        values = [o for o in parsed if not (CONF / o.key_or_group).is_dir()]
        if any(o.key_or_group.split(".")[0].split("/")[0] == "hydra" for o in parsed):
            return compose(overrides)
        key = tuple(str(o.input_line) for o in groups)
        if key not in self._base:
            self._base[key] = compose(list(key))
        cfg = copy.deepcopy(self._base[key])
        try:
            ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        return cfg


def hydra_context() -> Any:
    from hydra import initialize_config_dir

    return initialize_config_dir(str(CONF), version_base="1.3")


def check_options(opts: Options, backends: list[str], gpus: tuple[int, ...] = (1, 2)) -> Options:
    """Start-up checks of the command line; returns the options with an absolute calibration path. ``gpus``: the
    GPU counts of the selected entries (the 2-GPU hardware profile is only needed when 2 is among them)."""
    for b in backends:
        if b not in BACKENDS:
            raise ConfigError(f"--backends: unknown backend '{b}', use {', '.join(BACKENDS)}")
    if "sim" in backends:
        for hw in [opts.hardware] * (1 in gpus) + [opts.hw2] * (2 in gpus):
            if not (CONF / "hardware" / f"{hw}.yaml").is_file():
                raise ConfigError(f"--hardware / --hardware-2gpu: no profile conf/hardware/{hw}.yaml")
    for flag, field in (("--calibration", "calibration"), ("--calibration-2gpu", "calibration_2gpu")):
        value = getattr(opts, field)
        if not value:
            continue
        cal = Path(value).resolve()
        if not cal.is_file():
            raise ConfigError(f"{flag}: {value} is not a file")
        if "sim" in backends:
            base = compose(["experiment=validation"])
            if "calibration" not in base.backend:
                raise ConfigError(f"{flag}: this checkout's backend=sim config has no `calibration` field "
                                  "(conf/backend/sim.yaml), so the table would be ignored; drop it")
        opts = replace(opts, calibration=str(cal)) if field == "calibration" else replace(opts, calibration_2gpu=str(cal))
    return opts


def _cuda_state() -> tuple[Any, int]:
    try:
        import torch
    except ImportError:
        return None, 0
    return torch, torch.cuda.device_count() if torch.cuda.is_available() else 0


def _run_torch(cfg: DictConfig, folder: Path, entry: GridConfig) -> dict[str, Any]:
    """run_torch with the device allocator's peak per GPU and the probed device recorded."""
    from experiments.run_torch import run_torch
    from wicore.devices import probe

    torch, ngpu = _cuda_state()
    if entry.gpus > 1 and ngpu < entry.gpus:
        raise ConfigError(f"gpus={entry.gpus}: this machine has {ngpu} CUDA device(s); run it on a "
                          f"{entry.gpus}-GPU machine or pass --skip-2gpu")
    base: dict[int, int] = {}
    if ngpu:
        gc.collect()
        torch.cuda.empty_cache()
        for d in range(ngpu):
            dev = torch.device("cuda", d)
            torch.empty(0, device=dev)  # the allocator of a device exists once it has been used
            torch.cuda.reset_peak_memory_stats(dev)
            base[d] = int(torch.cuda.memory_allocated(dev))
    summary = run_torch(cfg, folder)
    info: dict[str, Any] = {"device": asdict(probe(measure=False))}
    if ngpu:
        peak = {str(d): int(torch.cuda.max_memory_allocated(d)) - base[d] for d in range(ngpu)}
        info["measured"] = {"gpu_peak_allocated_bytes": {d: v for d, v in peak.items() if v > 0},
                            "gpu_peak_reserved_bytes": {str(d): int(torch.cuda.max_memory_reserved(d))
                                                        for d in range(ngpu)},
                            "note": "torch allocator of this process, above what was allocated before the "
                                    "run; pipeline stages in other processes are not seen"}
    parallel = str((summary.get("run") or {}).get("parallel", ""))
    if entry.gpus == 2 and "pp2" not in parallel:
        raise ConfigError(f"parallel=pp: the real runtime ran '{parallel}', not 2 pipeline stages; "
                          "this checkout's backend=torch has no pipeline parallelism yet (use --skip-2gpu)")
    return info


def _free_torch() -> None:
    torch, ngpu = _cuda_state()
    gc.collect()
    if ngpu:
        torch.cuda.empty_cache()


def run_one(entry: GridConfig, backend: str, cfg: DictConfig | None, overrides: list[str], folder: Path,
            opts: Options) -> Outcome:
    """Run one entry on one backend into ``folder`` (cleared first); never raises for a bad run."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    write_overrides(folder, overrides)
    meta: dict[str, Any] = {"config": entry.name, "backend": backend, "gpus": entry.gpus,
                            "gpu_budget_gib": entry.gpu_budget_gib, "overrides": overrides}
    if backend == "sim":
        meta["hardware_profile"] = opts.hardware if entry.gpus == 1 else opts.hw2
        meta["calibration"] = opts.table(entry)
    t0 = time.perf_counter()
    out = Outcome(entry.name, backend, "ok")
    try:
        if cfg is None:
            cfg = compose(overrides)
        if backend == "sim":
            from experiments.run import run_sim
            run_sim(cfg, folder)
        else:
            meta.update(_run_torch(cfg, folder, entry))
    except ConfigError as e:
        out.status, out.error = "failed", str(e)
        (folder / "error.txt").write_text(f"{e}\n", encoding="utf-8")
    except Exception as e:  # a crash of one config (OOM, a bug) must not stop the grid
        out.status, out.error = "failed", f"{type(e).__name__}: {e}".splitlines()[0]
        (folder / "error.txt").write_text(f"{out.error}\n\n{traceback.format_exc()}", encoding="utf-8")
    finally:
        if backend == "torch":
            _free_torch()
    out.wall_s = time.perf_counter() - t0
    meta.update(status=out.status, error=out.error, wall_s=out.wall_s)
    (folder / "validation.json").write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    return out


def run_grid(entries: list[GridConfig], backends: list[str], out: Path, opts: Options = Options(),
             log: Any = print) -> list[Outcome]:
    """Run every entry on every backend into ``out/<name>/<backend>/``; return the outcomes.
    Every entry is composed for every backend before the first run (bad overrides stop here)."""
    out = Path(out)
    with hydra_context():
        opts = check_options(opts, backends, tuple(sorted({e.gpus for e in entries})))
        cfgs: dict[tuple[str, str], tuple[list[str], DictConfig]] = {}
        composer = Composer()
        for e in entries:
            for b in backends:
                ov = run_overrides(e, b, opts)
                try:
                    cfgs[(e.name, b)] = (ov, composer(ov))
                except ConfigError as err:
                    raise ConfigError(f"grid config {e.name} (backend={b}): {err}") from None
        out.mkdir(parents=True, exist_ok=True)
        if "torch" in backends and opts.warmup and entries:
            first = next((e for e in entries if e.gpus == 1), entries[0])
            ov = [*cfgs[(first.name, "torch")][0], "workload.num_requests=2"]
            w = run_one(first, "torch", None, ov, out / "_warmup" / "torch", opts)
            log(f"warm-up ({first.name}, torch, 2 requests): {w.status} {w.error}".rstrip())
            shutil.rmtree(out / "_warmup", ignore_errors=True)
        if opts.profile:  # tables from this process, then the sim sides composed again with them
            opts = profile_entries(entries, cfgs, out, opts, log)
            for e in entries:
                if "sim" in backends:
                    ov = run_overrides(e, "sim", opts)
                    cfgs[(e.name, "sim")] = (ov, composer(ov))
        results = []
        n = len(entries) * len(backends)
        for i, e in enumerate(entries):
            for j, b in enumerate(backends):
                ov, cfg = cfgs[(e.name, b)]
                k = i * len(backends) + j + 1
                for folder in (b, *repeat_folders(opts.repeat)) if b == "torch" else (b,):
                    res = run_one(e, b, cfg, ov, out / e.name / folder, opts)
                    results.append(res)
                    log(f"[{k}/{n}] {e.name} {folder}: {res.status} ({res.wall_s:.1f} s)"
                        + (f": {res.error}" if res.error else ""))
    return results


def repeat_folders(n: int) -> list[str]:
    """The folders of ``n`` repeated torch runs: ``torch_repeat``, ``torch_repeat2``, ..."""
    return ["torch_repeat" + (str(k + 1) if k else "") for k in range(n)]


def profile_entries(entries: list[GridConfig], cfgs: dict[tuple[str, str], tuple[list[str], DictConfig]], out: Path,
                    opts: Options, log: Any) -> Options:
    """``--profile``: one table per run shape of the 1-GPU entries, measured here (``validate_profile``); returns
    the options with each entry's table."""
    from experiments.validate_profile import entry_shape, profile_shapes

    shapes: dict[Any, Any] = {}
    of_entry = {}
    for e in entries:
        if e.gpus != 1:
            continue
        shape, spec_dev = entry_shape(cfgs[(e.name, "torch")][1], e.gpu_budget_gib)
        shapes.setdefault(shape, spec_dev)
        of_entry[e.name] = shape
    tables = profile_shapes(shapes, out / "calibration", opts.profile_grid, log)
    mapping = {name: Path(tables[shape]).name for name, shape in of_entry.items()}
    # the sim side may run later, elsewhere (--backends sim --profile): it reads which entry took which table
    index = out / "calibration" / PROFILED
    old = json.loads(index.read_text()) if index.is_file() else {}  # file names, as written: the folder may move
    index.write_text(json.dumps({**old, **mapping}, indent=2, sort_keys=True) + "\n")
    return replace(opts, entry_tables=tuple((name, tables[shape]) for name, shape in of_entry.items()))


PROFILED = "profiled_tables.json"


def profiled_tables(out: Path) -> dict[str, str]:
    """Entry name -> table (absolute path) that ``--profile`` measured into ``out/calibration/``."""
    path = out / "calibration" / PROFILED
    if not path.is_file():
        raise ConfigError(f"--profile with --backends sim: {path} is missing; run the torch side with --profile "
                          "first (into the same --out), or give --calibration")
    return {name: str((path.parent / file).resolve()) for name, file in json.loads(path.read_text()).items()}


def report(out: Path, sets: list[Path] | None = None) -> Path:
    """(Re)write the fidelity report of a validation folder, or (``sets``) write into ``out`` the report of the
    configs of several validation folders taken together."""
    from wicore.fidelity import fidelity_report, load_sets

    roots: list[Path | str] = list(sets or [out])
    pairs, missing = load_sets(roots, median_run=True)
    repeats, _ = load_sets(roots, real="torch", sim="torch_repeat")
    if sets:
        out.mkdir(parents=True, exist_ok=True)
        (out / "sets.json").write_text(json.dumps([str(r) for r in roots], indent=1) + "\n", encoding="utf-8")
    return fidelity_report(pairs, out, missing, repeats)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.validate",
                                 description="Run the validation grid on backend=torch and backend=sim and write "
                                             "the fidelity report.")
    ap.add_argument("--out", type=Path, help="result directory (one folder per config and backend)")
    ap.add_argument("--backends", default="torch,sim", help="comma list of torch, sim (default: both)")
    ap.add_argument("--only", default="", help="comma list of grid config names or shell patterns")
    ap.add_argument("--skip-2gpu", action="store_true", help="leave out the gpus: 2 subset")
    ap.add_argument("--hardware", default="h100", help="sim profile of the GPU machine (conf/hardware/)")
    ap.add_argument("--hardware-2gpu", default=None, help="sim profile for 2-GPU entries (default <hardware>x2)")
    ap.add_argument("--calibration", default=None, help="calibration table (CSV) for the sim side (1-GPU entries)")
    ap.add_argument("--calibration-2gpu", default=None,
                    help="calibration table for the 2-GPU entries (`wicore profile --pp 2`); without it they run on "
                         "the roofline")
    ap.add_argument("--profile", action="store_true",
                    help="before the torch runs, profile each 1-GPU entry's run shape in this same process and give "
                         "the sim side those tables (DIR/calibration/; instead of --calibration); with --backends "
                         "sim alone: use the tables an earlier --profile run measured into DIR")
    ap.add_argument("--profile-grid", action="append", default=[], metavar="FIELD=VALUES",
                    help="override a field of that profile's grid (repeatable), as `wicore profile --grid`")
    ap.add_argument("--extra", nargs="+", action="extend", default=[], metavar="OVERRIDE",
                    help="Hydra overrides appended to every run on both backends")
    ap.add_argument("--torch-extra", nargs="+", action="extend", default=[], metavar="OVERRIDE",
                    help="Hydra overrides appended to the torch side only (e.g. backend.cuda_graphs=true)")
    ap.add_argument("--repeat", type=int, nargs="?", const=1, default=0, metavar="N",
                    help="run the torch side N more times (default 1: <config>/torch_repeat, then torch_repeat2, "
                         "...): the report states the real runtime's own run-to-run differences next to the "
                         "simulator's error; from N=2 on, each config's run of median throughput is its real side")
    ap.add_argument("--grid", type=Path, default=GRID, help=f"grid file (default {GRID.relative_to(ROOT)})")
    ap.add_argument("--no-warmup", action="store_true", help="skip the throw-away torch warm-up run")
    ap.add_argument("--report-only", type=Path, metavar="DIR", help="only (re)write DIR's fidelity report")
    ap.add_argument("--combine", type=Path, nargs="+", metavar="DIR",
                    help="write into --out the fidelity report of these validation folders' configs together "
                         "(sets run on different machines or commits; nothing runs)")
    args = ap.parse_args(argv)
    try:
        if args.combine:
            bad = [str(d) for d in args.combine if not d.is_dir()]
            if bad:
                raise ConfigError(f"--combine: not a directory: {', '.join(bad)}")
            if args.out is None:
                raise ConfigError("--combine: give --out, the folder to write the combined report into")
            if args.out.resolve() in {d.resolve() for d in args.combine}:
                raise ConfigError("--combine: --out must be a folder of its own, not one of the combined sets")
            print(report(args.out, args.combine))
            return 0
        if args.report_only is not None:
            if not args.report_only.is_dir():
                raise ConfigError(f"--report-only: {args.report_only} is not a directory")
            print(report(args.report_only))
            return 0
        if args.out is None:
            raise ConfigError("--out: give the result directory (or --report-only DIR)")
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        if not backends:
            raise ConfigError("--backends: give torch, sim or both")
        only = [s.strip() for s in args.only.split(",") if s.strip()]
        entries = select(load_grid(args.grid), only, args.skip_2gpu)
        if not entries:
            raise ConfigError("--only / --skip-2gpu: no grid config left to run")
        if args.repeat < 0:
            raise ConfigError(f"--repeat: give a number of extra torch runs >= 0, got {args.repeat}")
        if args.profile and args.calibration:
            raise ConfigError("--profile and --calibration: the sim side takes one table per entry; drop one of them")
        if args.profile_grid:
            from wicore.runtime.profiler import ProfileGrid, grid_with

            grid_with(ProfileGrid(), args.profile_grid)  # a bad field fails here, before any run
        opts = Options(args.hardware, args.hardware_2gpu, args.calibration, tuple(args.extra),
                       not args.no_warmup, tuple(args.torch_extra), args.repeat, args.calibration_2gpu,
                       args.profile and "torch" in backends, tuple(args.profile_grid))
        if args.profile and "torch" not in backends:  # the sim side of an earlier --profile run: its tables
            opts = replace(opts, entry_tables=tuple(profiled_tables(args.out).items()))
        results = run_grid(entries, backends, args.out, opts)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [r for r in results if r.status != "ok"]
    print(f"{len(results) - len(failed)} of {len(results)} runs ok" + (
        f"; failed: {', '.join(f'{r.config}/{r.backend}' for r in failed)}" if failed else ""))
    print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
