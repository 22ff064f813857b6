"""Validation grid, runner, result loaders and the fidelity report (CPU, tiny-gemma3)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from experiments.validate import (
    GRID,
    Composer,
    Options,
    check_options,
    compose,
    hydra_context,
    load_grid,
    main,
    run_overrides,
    select,
)
from wicore.errors import ConfigError
from wicore.fidelity import CORE, MEDIAN_TARGET, P90_TARGET, fidelity_stats, load_pairs
from wicore.memory.placement import StaticPlacement
from wicore.results import load_run, load_runs, pareto_front, runs_frame, tier_timeline

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SMALL = ["--extra", "workload.num_requests=3", "--no-warmup"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def validation_dir(tmp_path_factory: pytest.TempPathFactory, torch_one_thread: None) -> Path:
    out = tmp_path_factory.mktemp("validation")
    rc = main(["--backends", "torch,sim", "--out", str(out), "--only", "tiny-c1-short,tiny-c4-short", *SMALL,
               "--repeat", "--torch-extra", "backend.cuda_graphs=true"])
    assert rc == 0
    return out


def _summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


# ----- the grid ---------------------------------------------------------------------------------
def test_grid_has_30_configs_spanning_the_axes_and_each_composes_on_both_backends():
    grid = load_grid()
    one_gpu = [g for g in grid if g.gpus == 1]
    assert len(one_gpu) >= 30 and any(g.gpus == 2 for g in grid)
    text = [" ".join(g.overrides) for g in grid]
    for needle in ("model=tiny-gemma3", "model=gemma3-1b", "model.dtype=fp16", "scheduler.batching=static",
                   "scheduler.batching=chunked_prefill", "scheduler.queue=spf", "workload.prompt.value=1024"):
        assert any(needle in t for t in text), needle
    assert {c for g in grid for o in g.overrides if o.startswith("workload.concurrency=")
            for c in [int(o.split("=")[1])]} >= {1, 4, 16, 32}
    assert any(g.gpu_budget_gib for g in grid) and any(g.gpu_budget_gib is None for g in grid)
    assert [g.name for g in select(grid, skip_2gpu=True)] == [g.name for g in one_gpu]
    with hydra_context():
        composer = Composer()
        for g in grid:
            sim = composer(run_overrides(g, "sim", Options()))
            real = composer(run_overrides(g, "torch", Options()))
            assert sim.backend.name == "sim" and real.backend.name == "torch", g.name
            assert sim.hardware.name == ("h100" if g.gpus == 1 else "h100x2"), g.name
            assert sim.parallel.pp == real.parallel.pp == g.gpus, g.name
            assert real.backend.gpu_budget_gib == g.gpu_budget_gib, g.name
            if g.gpu_budget_gib is not None:
                assert sim.hardware.gpu.memory_gib == g.gpu_budget_gib, g.name
            for cfg in (sim, real):  # the same workload, model and scheduler on both sides
                assert cfg.workload == sim.workload and cfg.model == sim.model and cfg.scheduler == sim.scheduler
                assert cfg.report.enabled is False and cfg.workload.kind == "closed_loop"
                longest = cfg.workload.prompt.value + cfg.workload.output.value if (
                    cfg.workload.prompt.kind == "fixed") else cfg.workload.prompt.high + cfg.workload.output.high
                assert longest <= min(cfg.model.max_context, 2048), g.name  # fits a torch KV slot


def test_cached_composition_equals_hydra_compose():
    grid = load_grid()
    picks = [grid[0], next(g for g in grid if g.gpu_budget_gib), next(g for g in grid if g.gpus == 2)]
    with hydra_context():
        composer = Composer()
        for g in picks:
            for backend in ("sim", "torch"):
                ov = run_overrides(g, backend, Options(extra=("seed=3",)))
                fast, full = composer(ov), compose(ov)
                assert OmegaConf.to_yaml(fast, resolve=True) == OmegaConf.to_yaml(full, resolve=True), g.name
                assert OmegaConf.is_struct(fast) == OmegaConf.is_struct(full)
        with pytest.raises(ConfigError, match="no_such_field"):
            composer(["experiment=validation", "workload.no_such_field=1"])


def test_offloaded_grid_entries_stream_part_of_the_layers_not_all():
    from experiments.build import memory_config, plain, resolve_model
    from wicore.hal import hardware_from_config

    budgets = [g for g in load_grid() if g.gpu_budget_gib is not None]
    assert len(budgets) >= 4
    with hydra_context():
        composer = Composer()
        for g in budgets:
            cfg = composer(run_overrides(g, "sim", Options()))
            hw = hardware_from_config(plain(cfg.hardware))
            spec = resolve_model(cfg.model, hw)
            streamed = len(StaticPlacement(spec, hw, [0], 1, 1, memory_config(cfg)).placements[0].streamed)
            assert 0 < streamed < spec.num_layers, (g.name, streamed)


def test_calibration_and_hardware_reach_only_the_sim_side(tmp_path):
    g = next(e for e in load_grid() if e.gpus == 2)
    table = tmp_path / "cal.csv"
    table.write_text("op,seconds\n")
    one = next(e for e in load_grid() if e.gpus == 1)
    table2 = tmp_path / "cal_pp2.csv"
    table2.write_text("op,seconds\n")
    opts = Options(hardware="a100_80g", hardware_2gpu="h100x2", calibration=str(table), calibration_2gpu=str(table2))
    sim, real = run_overrides(g, "sim", opts), run_overrides(g, "torch", opts)
    # a 2-GPU entry gets the --calibration-2gpu table (a pipeline's steps), a 1-GPU entry the --calibration one
    assert f"backend.calibration={table2}" in sim and not any("calibration" in o for o in real)
    assert f"backend.calibration={table}" in run_overrides(one, "sim", opts)
    no_pp_table = run_overrides(g, "sim", Options(calibration=str(table)))
    assert not any("calibration" in o for o in no_pp_table)  # a 1-GPU table never costs a pipeline
    assert "hardware=h100x2" in sim and "parallel=pp" in sim and "parallel=pp" in real
    assert not any(o.startswith("hardware") for o in real)
    with hydra_context():
        if "calibration" in compose(["experiment=validation"]).backend:
            assert check_options(opts, ["sim"]).calibration == str(table.resolve())
        else:  # the table would be ignored: refuse at start-up instead
            with pytest.raises(ConfigError, match="calibration"):
                check_options(opts, ["sim"])
        with pytest.raises(ConfigError, match="--calibration"):
            check_options(Options(calibration=str(tmp_path / "missing.csv")), ["sim"])
        with pytest.raises(ConfigError, match="--calibration-2gpu"):
            check_options(Options(calibration_2gpu=str(tmp_path / "missing.csv")), ["sim"])
        with pytest.raises(ConfigError, match="hardware"):
            check_options(Options(hardware="nope"), ["sim"])
        with pytest.raises(ConfigError, match="nopex2"):
            check_options(Options(hardware="t4", hardware_2gpu="nopex2"), ["sim"])
        # without 2-GPU entries (--skip-2gpu) a missing 2-GPU profile is no reason to stop
        assert check_options(Options(hardware="t4", hardware_2gpu="nopex2"), ["sim"], (1,)).hardware == "t4"


def test_bad_command_lines_fail_at_start_with_one_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "v"), "--only", "no-such-config"]) == 2
    assert "--only" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "v"), "--backends", "gpu"]) == 2
    assert "--backends" in capsys.readouterr().err
    bad = tmp_path / "grid.yaml"
    bad.write_text(yaml.safe_dump({"configs": [{"name": "a", "overrides": ["model=tiny-gemma3"], "gpus": 3}]}))
    assert main(["--out", str(tmp_path / "v"), "--grid", str(bad)]) == 2
    assert "gpus" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"configs": [{"name": "a", "overrides": ["workload.no_such_field=1"]}]}))
    assert main(["--out", str(tmp_path / "v"), "--grid", str(bad), "--backends", "sim"]) == 2
    err = capsys.readouterr().err
    assert "grid config a" in err and "no_such_field" in err
    assert not (tmp_path / "v").exists()  # nothing ran


# ----- a run of the grid ------------------------------------------------------------------------
def test_validation_run_writes_pairs_and_a_report_that_matches_the_summaries(validation_dir):
    out = validation_dir
    for name in ("fidelity.csv", "fidelity_summary.csv", "fidelity_steps.csv", "fidelity.md"):
        assert (out / name).is_file(), name
    for name in ("parity.png", "error_cdf.png", "step_times.png"):
        assert (out / "plots" / name).read_bytes()[:8] == PNG, name
    rows = pd.read_csv(out / "fidelity.csv")
    assert sorted(rows["config"].unique()) == ["tiny-c1-short", "tiny-c4-short"]
    errs: dict[str, list[float]] = {}
    for cfg in ("tiny-c1-short", "tiny-c4-short"):
        s, r = _summary(out / cfg / "sim"), _summary(out / cfg / "torch")
        assert s["run"]["backend"] == "sim" and r["run"]["backend"] == "torch"
        assert s["run"]["hardware"] == "h100" and s["requests"] == r["requests"] == 3
        for key, _, _, _ in CORE:
            row = rows[(rows["config"] == cfg) & (rows["metric"] == key)].iloc[0]
            assert row["sim"] == pytest.approx(s[key]) and row["real"] == pytest.approx(r[key])
            assert row["rel_err"] == pytest.approx((s[key] - r[key]) / r[key])
            errs.setdefault(key, []).append(abs((s[key] - r[key]) / r[key]))
        peak = {side: pd.read_parquet(out / cfg / side / "tiers.parquet").query("tier == 'gpu0'")["used_bytes"].max()
                for side in ("sim", "torch")}
        mem = rows[(rows["config"] == cfg) & (rows["metric"] == "peak_mem_gpu0")].iloc[0]
        assert (mem["sim"], mem["real"]) == (peak["sim"], peak["torch"])
        meta = json.loads((out / cfg / "torch" / "validation.json").read_text())
        assert meta["status"] == "ok" and meta["device"]["gpu"]["name"]  # the probed device is recorded
        assert "backend=torch" in yaml.safe_load((out / cfg / "torch" / ".hydra" / "overrides.yaml").read_text())
    stats = pd.read_csv(out / "fidelity_summary.csv").set_index("metric")
    for key, vals in errs.items():
        assert stats.loc[key, "median_abs"] == pytest.approx(np.median(vals))
        assert stats.loc[key, "p90_abs"] == pytest.approx(np.percentile(vals, 90))
    md = (out / "fidelity.md").read_text()
    assert "2 configs ran on both backends" in md and "plots/parity.png" in md
    # --torch-extra reaches the torch side only; --repeat ran it twice and the report states the noise
    for cfg in ("tiny-c1-short", "tiny-c4-short"):
        torch_cfg = yaml.safe_load((out / cfg / "torch" / "config.yaml").read_text())
        assert torch_cfg["backend"]["cuda_graphs"] is True
        assert "cuda_graphs" not in yaml.safe_load((out / cfg / "sim" / "config.yaml").read_text())["backend"]
        assert _summary(out / cfg / "torch_repeat")["requests"] == 3
    noise = pd.read_csv(out / "fidelity_noise.csv").set_index("metric")
    first = _summary(out / "tiny-c1-short" / "torch")["ttft_p50"]
    again = _summary(out / "tiny-c1-short" / "torch_repeat")["ttft_p50"]
    other = abs(_summary(out / "tiny-c4-short" / "torch_repeat")["ttft_p50"]
                / _summary(out / "tiny-c4-short" / "torch")["ttft_p50"] - 1)
    assert noise.loc["ttft_p50", "median_abs"] == pytest.approx(np.median([abs(again / first - 1), other]))
    assert "## Measurement noise: the real run repeated" in md
    # a CPU run against the H100 profile is far off: the report must say so, never claim the target
    assert "All 5 target metrics meet both targets" not in md and "Missed for" in md


def test_time_decomposition_adds_up_to_the_run_time_error(validation_dir):
    dec = pd.read_csv(validation_dir / "fidelity_steps.csv")
    for cfg, g in dec.groupby("config"):
        s, r = _summary(validation_dir / cfg / "sim"), _summary(validation_dir / cfg / "torch")
        assert g["delta_s"].sum() == pytest.approx(s["duration_s"] - r["duration_s"], rel=1e-6, abs=1e-9)
        steps = pd.read_parquet(validation_dir / cfg / "torch" / "steps.parquet")
        assert g.loc[g["kind"] != "outside", "real_s"].sum() == pytest.approx(steps["duration"].sum())


def test_loaders_read_runs_with_their_overrides(validation_dir):
    runs = load_runs(validation_dir)
    assert sorted(str(r.path.relative_to(validation_dir)) for r in runs) == [
        f"{c}/{side}" for c in ("tiny-c1-short", "tiny-c4-short") for side in ("sim", "torch", "torch_repeat")]
    df = runs_frame(validation_dir)
    assert list(df["backend"]) == ["sim", "torch", "torch"] * 2 and (df["status"] == "ok").all()
    assert list(df["workload.concurrency"]) == [1, 1, 1, 4, 4, 4]
    run = load_run(validation_dir / "tiny-c4-short" / "sim")
    assert run.ok and len(run.requests) == 3 and len(run.steps) and run.config["model"]["name"] == "tiny-gemma3"
    assert run.overrides["hardware"] == "h100" and run.meta["hardware_profile"] == "h100"
    assert run.end_time == pytest.approx(run.metric("duration_s"))
    # the report can be rewritten from the folder alone
    (validation_dir / "fidelity.md").unlink()
    assert main(["--report-only", str(validation_dir)]) == 0
    assert (validation_dir / "fidelity.md").is_file()


def test_a_failing_config_leaves_the_others_intact(tmp_path):
    grid = yaml.safe_load(GRID.read_text())
    good = next(c for c in grid["configs"] if c["name"] == "tiny-c1-short")
    two = next(c for c in grid["configs"] if c.get("gpus") == 2 and "tiny" in c["name"])
    bad = {**good, "name": "broken", "overrides": [*good["overrides"], "scheduler.batching=fancy"]}
    grid["configs"] = [bad, good, two]
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = tmp_path / "v"
    assert main(["--grid", str(path), "--out", str(out), *SMALL]) == 0
    for side in ("sim", "torch"):
        assert "scheduler.batching" in (out / "broken" / side / "error.txt").read_text()
        assert not (out / "broken" / side / "summary.json").exists()
        assert load_run(out / "tiny-c1-short" / side).ok
    assert "gpus=2" in (out / two["name"] / "torch" / "error.txt").read_text()  # this machine has no 2 GPUs
    assert load_run(out / two["name"] / "sim").ok
    pairs, missing = load_pairs(out)
    assert [p.config for p in pairs] == ["tiny-c1-short"]
    assert set(missing) == {"broken", two["name"]} and "torch: gpus=2" in missing[two["name"]]
    md = (out / "fidelity.md").read_text()
    assert "1 configs ran on both backends; 2 have no pair" in md and "broken" in md


# ----- pure helpers -----------------------------------------------------------------------------
def test_pareto_front_and_tier_timeline():
    df = pd.DataFrame({"lat": [1.0, 2.0, 3.0, 2.5, np.nan], "thr": [10.0, 30.0, 20.0, 40.0, 99.0]})
    assert list(pareto_front(df, "lat", "thr").index) == [0, 1, 3]
    tiers = pd.DataFrame({"time": [0.0, 0.0, 1.0, 3.0], "replica": 0, "tier": ["gpu0", "cpu", "gpu0", "gpu0"],
                          "used_bytes": [2**30, 0, 2 * 2**30, 2**30], "capacity_bytes": [4 * 2**30, 8 * 2**30,
                                                                                          4 * 2**30, 4 * 2**30]})
    tl = tier_timeline(tiers, end=5.0)
    gpu = tl[tl["tier"] == "gpu0"]
    assert list(gpu["start"]) == [0.0, 1.0, 3.0] and list(gpu["stop"]) == [1.0, 3.0, 5.0]
    assert list(gpu["used_gib"]) == [1.0, 2.0, 1.0] and list(gpu["share"]) == [0.25, 0.5, 0.25]
    assert list(tl.loc[tl["tier"] == "cpu", "stop"]) == [5.0]


def test_fidelity_stats_pass_only_when_both_targets_hold():
    def rows(errs: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"metric": "ttft_p50", "label": "TTFT p50", "rel_err": errs,
                             "abs_rel_err": np.abs(errs), "target": True})

    ok = fidelity_stats(rows([0.01, -0.02, 0.0, 0.025, -0.01, 0.02, 0.01, -0.015, 0.005, 0.03]))
    assert bool(ok["met"].iloc[0])
    tail = fidelity_stats(rows([0.01] * 8 + [0.2, 0.3]))  # median fine, p90 not
    assert bool(tail["median_ok"].iloc[0]) and not bool(tail["p90_ok"].iloc[0]) and not bool(tail["met"].iloc[0])
    assert tail["median_abs"].iloc[0] <= MEDIAN_TARGET < P90_TARGET < tail["p90_abs"].iloc[0]


def test_report_states_the_spread_of_the_measured_costs_it_used(validation_dir, tmp_path):
    """With a calibration table on the sim side, the report lists every table op the runs looked up with the
    spread (p90 / p10) of its profiled points."""
    table = Path(__file__).parent / "data" / "calib_tiny_gemma3_cpu.csv"
    out = tmp_path / "v"
    shutil.copytree(validation_dir, out)
    assert main(["--backends", "sim", "--out", str(out), "--only", "tiny-c1-short,tiny-c4-short",
                 "--calibration", str(table), *SMALL]) == 0
    spread = pd.read_csv(out / "fidelity_cost_spread.csv")
    rows = pd.read_csv(table)
    used = json.loads((out / "tiny-c4-short" / "sim" / "cost_sources.json").read_text())
    looked_up = {op for op, v in used["ops"].items() if sum(n for k, n in v["lookups"].items() if k != "roofline")}
    assert set(spread["op"]) == looked_up and "decode_forward_mass" in looked_up
    g = rows[(rows["op"] == "decode_forward_mass") & (rows["model"] == "tiny-gemma3")]
    got = spread.set_index("op").loc["decode_forward_mass"]
    assert got["points"] == len(g) and got["median_spread"] == pytest.approx((g["p90_s"] / g["p10_s"]).median())
    assert "## Spread of the measured costs" in (out / "fidelity.md").read_text()


def test_group_stats_split_the_errors_by_what_configs_share(validation_dir):
    """A kind with two or more groups gets a row per group: its configs' median / p90 |error|; a kind every
    config shares (here the model, the weights, the GPU count) gets none."""
    import copy
    import dataclasses

    from wicore.fidelity import compare_all, config_groups, group_stats
    from wicore.fidelity_md import _groups

    pairs, _ = load_pairs(validation_dir)
    assert config_groups(pairs[0]) == {"model": "tiny-gemma3 fp32", "weights": "all resident",
                                       "batching": "continuous", "GPUs": "1 GPU"}
    real = copy.deepcopy(pairs[1].real)
    real.summary["run"]["batching"] = "static"
    pairs = [pairs[0], dataclasses.replace(pairs[1], real=real)]
    rows = compare_all(pairs)
    groups = group_stats(pairs, rows)
    assert list(groups["kind"]) == ["batching", "batching"] and list(groups["group"]) == ["continuous", "static"]
    for g, p in zip(groups.itertuples(), pairs):
        for m in ("ttft_p50", "tpot_p50", "output_tokens_per_s"):
            err = rows[(rows["config"] == p.config) & (rows["metric"] == m)]["abs_rel_err"].iloc[0]
            assert getattr(g, f"{m}_median_abs") == pytest.approx(err) == getattr(g, f"{m}_p90_abs")
    md = "\n".join(_groups(groups))
    assert "## By group" in md and "| batching | static | 1 |" in md


def test_profile_in_the_validation_process_gives_each_entry_its_table(tmp_path):
    """--profile: one table per run shape, measured in the runner's process before the torch runs; each sim side
    uses its entry's table (here both tiny entries share one shape, with the torch side's CUDA-graph setting)."""
    grid = ["--profile-grid", "decode_batches=1,2,4", "--profile-grid", "decode_contexts=16,64",
            "--profile-grid", "prefill_tokens=16,64", "--profile-grid", "prefill_context_points=",
            "--profile-grid", "reps=3", "--profile-grid", "rounds=1", "--profile-grid", "overhead_batches=1,4",
            "--profile-grid", "overhead_steps=5", "--profile-grid", "check_points="]
    out = tmp_path / "v"
    assert main(["--backends", "torch,sim", "--out", str(out), "--only", "tiny-c1-short,tiny-c4-short", *SMALL,
                 "--profile", *grid, "--torch-extra", "backend.cuda_graphs=true"]) == 0
    tables = sorted((out / "calibration").glob("*.csv"))
    assert [t.name for t in tables] == ["tiny-gemma3_fp32_len512_graphs.csv"]
    meta = json.loads((out / "calibration" / (tables[0].name + ".meta.json")).read_text())
    assert meta["cuda_graphs"] is True and meta["model"] == "tiny-gemma3"
    for cfg in ("tiny-c1-short", "tiny-c4-short"):
        sim_cfg = yaml.safe_load((out / cfg / "sim" / "config.yaml").read_text())
        assert sim_cfg["backend"]["calibration"] == str(tables[0].resolve())
        sources = json.loads((out / cfg / "sim" / "cost_sources.json").read_text())
        assert sources["calibrated"] and "decode_step_mass" in sources["whole_steps"]
    # the sim side again, later (as on another machine): the entries take the tables the torch side measured
    mapping = json.loads((out / "calibration" / "profiled_tables.json").read_text())
    assert mapping == {"tiny-c1-short": tables[0].name, "tiny-c4-short": tables[0].name}
    # a second --profile call into the same folder adds its entries and keeps the first call's as file names
    assert main(["--backends", "torch", "--out", str(out), "--only", "tiny-c1-long", *SMALL, "--profile", *grid]) == 0
    mapping = json.loads((out / "calibration" / "profiled_tables.json").read_text())
    assert sorted(mapping) == ["tiny-c1-long", "tiny-c1-short", "tiny-c4-short"]
    assert all("/" not in name for name in mapping.values())
    (out / "tiny-c1-short" / "sim").rename(out / "old_sim")
    assert main(["--backends", "sim", "--out", str(out), "--only", "tiny-c1-short", *SMALL, "--profile"]) == 0
    sim_cfg = yaml.safe_load((out / "tiny-c1-short" / "sim" / "config.yaml").read_text())
    assert sim_cfg["backend"]["calibration"] == str(tables[0].resolve())
    assert main(["--backends", "sim", "--out", str(tmp_path / "empty"), "--profile"]) == 2  # nothing profiled there
    assert main(["--backends", "torch", "--out", str(out), "--profile", "--profile-grid", "nope=1"]) == 2


def test_report_flags_real_runs_whose_first_step_starts_late(validation_dir, tmp_path):
    """Time on the real run's clock before its first step (a set-up cost, a collection) is named, with the config."""
    out = tmp_path / "v"
    shutil.copytree(validation_dir, out)
    path = out / "tiny-c4-short" / "torch" / "steps.parquet"
    steps = pd.read_parquet(path)
    steps[["start", "end"]] += 0.5  # everything 500 ms later, as behind a pause at the start of the clock
    steps.to_parquet(path)
    assert main(["--report-only", str(out)]) == 0
    text = (out / "fidelity.md").read_text()
    # (the other config's CPU run is not moved; on a loaded machine its own start may be late too)
    assert re.search(r"\*\*Late real starts:\*\* in [12] of 2 configs .* \(up to \d+ ms, tiny-c4-short\)", text)


def test_combined_report_takes_the_configs_of_several_sets(validation_dir, tmp_path, capsys):
    """--combine writes one report over several validation folders: every pair counted once per set, a config
    two sets hold named after its set; the repeats come along as the noise rows; nothing is rewritten in the
    sets themselves. A missing set or an --out that is one of the sets fails at start."""
    from wicore.fidelity import load_sets

    other = tmp_path / "second"
    shutil.copytree(validation_dir, other)
    shutil.rmtree(other / "tiny-c4-short")
    before = (validation_dir / "fidelity.md").read_text()
    out = tmp_path / "combined"
    assert main(["--combine", str(validation_dir), str(other), "--out", str(out)]) == 0
    rows = pd.read_csv(out / "fidelity.csv")
    assert set(rows["config"]) == {f"{validation_dir.name}/tiny-c1-short", "second/tiny-c1-short", "tiny-c4-short"}
    single, _ = load_pairs(validation_dir)
    merged, _ = load_sets([validation_dir, other])
    assert len(merged) == len(single) + 1
    assert pd.read_csv(out / "fidelity_noise.csv").set_index("metric").loc["tpot_p50", "n"] == 3
    assert "3 configs ran on both backends" in (out / "fidelity.md").read_text()
    assert json.loads((out / "sets.json").read_text()) == [str(validation_dir), str(other)]
    assert (validation_dir / "fidelity.md").read_text() == before
    capsys.readouterr()
    assert main(["--combine", str(validation_dir), str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert main(["--combine", str(validation_dir), "--out", str(validation_dir)]) == 2
    assert main(["--combine", str(validation_dir)]) == 2
    err = capsys.readouterr().err
    assert "not a directory" in err and "folder of its own" in err and "give --out" in err


def test_median_of_three_real_runs_stands_for_the_real_side(validation_dir, tmp_path, capsys):
    """With three real runs of a config (validate --repeat 2), the one of median output throughput is its real
    side in the report, so one disturbed run does not move the comparison; the noise rows stay first run vs
    first repeat; configs with fewer runs keep their first run."""
    from experiments.validate import repeat_folders
    from wicore.fidelity import real_folders

    assert repeat_folders(0) == [] and repeat_folders(3) == ["torch_repeat", "torch_repeat2", "torch_repeat3"]
    out = tmp_path / "v"
    shutil.copytree(validation_dir, out)
    cfg = out / "tiny-c4-short"
    shutil.copytree(cfg / "torch_repeat", cfg / "torch_repeat2")
    thr = {}
    for name, scale in (("torch", 0.5), ("torch_repeat", 1.0), ("torch_repeat2", 2.0)):  # first run: slowest
        path = cfg / name / "summary.json"
        s = json.loads(path.read_text())
        s["output_tokens_per_s"] *= scale
        s["tpot_p50"] = 0.001 * (1 + scale)  # tells the runs apart in the rows
        thr[name] = s["output_tokens_per_s"]
        path.write_text(json.dumps(s))
    assert real_folders(cfg) == ["torch", "torch_repeat", "torch_repeat2"]
    assert sorted(thr, key=thr.get)[1] == "torch_repeat"
    assert main(["--report-only", str(out)]) == 0
    rows = pd.read_csv(out / "fidelity.csv").set_index(["config", "metric"])
    assert rows.loc[("tiny-c4-short", "tpot_p50"), "real"] == pytest.approx(0.002)  # torch_repeat's
    assert rows.loc[("tiny-c4-short", "output_tokens_per_s"), "real"] == pytest.approx(thr["torch_repeat"])
    first = _summary(out / "tiny-c1-short" / "torch")["tpot_p50"]
    assert rows.loc[("tiny-c1-short", "tpot_p50"), "real"] == pytest.approx(first)  # two runs: the first
    md = (out / "fidelity.md").read_text()
    assert "**Real side:** for the 1 of 2 configs whose real runtime ran 3 times" in md
    assert "tiny-c4-short: `torch_repeat`" in md
    noise, _ = load_pairs(out, real="torch", sim="torch_repeat")
    assert {p.config: p.real.path.name for p in noise} == {"tiny-c1-short": "torch", "tiny-c4-short": "torch"}
    capsys.readouterr()
    assert main(["--backends", "sim", "--out", str(tmp_path / "x"), "--repeat", "-1"]) == 2
    assert "--repeat: give a number of extra torch runs >= 0" in capsys.readouterr().err
