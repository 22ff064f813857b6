"""Calibration tables: validation, interpolation, the simulator's calibrated steps, the profiler."""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest

from experiments.build import build_sim
from experiments.run import run_sim
from sim.calibrated_cost import roofline_sources
from sim.calibration import COLUMNS, CalibrationTable
from tests.conftest import ROOT, make_cfg
from wicore.errors import ConfigError

TABLE = ROOT / "tests" / "data" / "calib_tiny_gemma3_cpu.csv"
BASE = ["hardware=h100", "model=tiny-gemma3", "report.enabled=false", "progress=false",
        f"backend.calibration={TABLE}"]
SMALL = ["workload.num_requests=4", "workload.prompt.kind=fixed", "workload.prompt.value=32",
         "workload.output.kind=fixed", "workload.output.value=4"]


def _rows(path: Path = TABLE) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _value(op: str, **coords: int) -> float:
    """The committed table's own number at a profiled point (read from the CSV, not through lookup)."""
    hits = [r for r in _rows() if r["op"] == op and all(int(r[k]) == v for k, v in coords.items())]
    assert len(hits) == 1, (op, coords, len(hits))
    return float(hits[0]["seconds"])


def _write(path: Path, rows: list[dict[str, object]]) -> Path:
    full = [{"model": "m", "dtype": "bf16", "device_name": "dev", "batch": 0, "tokens": 0, "context": 0,
             "nbytes": 0, "p10_s": r["seconds"], "p90_s": r["seconds"], "samples": 5, **r} for r in rows]
    return CalibrationTable.write(path, full, {"note": "test"})


def _run(cfg):
    setup = build_sim(cfg)
    setup.driver.run()
    return setup, setup.recorder.frames()[1]


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    """The calibrated step is the table's composition, so it matches to float rounding (the fidelity bar
    is 2%; a step that missed the sample or the overhead, 1-3% of a decode here, would pass that)."""
    return abs(a - b) <= rel * b


# ----- loading and validation ---------------------------------------------------------------
def test_committed_table_loads_with_meta():
    t = CalibrationTable.load(TABLE)
    assert {"decode_forward", "decode_forward_mass", "prefill_forward", "sample", "step_overhead"} <= set(t.ops())
    assert ("tiny-gemma3", "fp32") in t.models()
    assert t.meta["torch_version"] and t.meta["measured_at"] and t.meta["max_len"] == 512


def test_load_errors_name_the_file_and_the_column(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        CalibrationTable.load(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(c for c in COLUMNS if c != "p90_s") + "\n")
    with pytest.raises(ConfigError, match=r"bad\.csv.*missing column 'p90_s'"):
        CalibrationTable.load(bad)
    rows = _rows()
    rows[3]["seconds"] = "fast"
    with (tmp_path / "nan.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ConfigError, match=r"nan\.csv: line 5, column 'seconds'"):
        CalibrationTable.load(tmp_path / "nan.csv")
    dup = _write(tmp_path / "dup.csv", [{"op": "sample", "batch": 2, "seconds": 1.0},
                                        {"op": "sample", "batch": 2, "seconds": 2.0}])
    with pytest.raises(ConfigError, match="two rows"):
        CalibrationTable.load(dup)
    empty = tmp_path / "empty.csv"
    empty.write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(ConfigError, match="no rows"):
        CalibrationTable.load(empty)


# ----- interpolation --------------------------------------------------------------------------
def test_interpolation_is_exact_at_points_and_linear_between(tmp_path):
    grid = {(1, 16): 1.0, (1, 256): 2.0, (4, 16): 3.0, (4, 256): 5.0, (8, 16): 4.0, (8, 256): 8.0}
    rows: list[dict[str, object]] = [{"op": "decode_forward", "batch": b, "context": c, "seconds": v}
                                     for (b, c), v in grid.items()]
    rows += [{"op": "prefill_forward", "tokens": t, "context": 0, "seconds": t / 100} for t in (16, 64, 256)]
    rows += [{"op": "prefill_forward", "tokens": 64, "context": 512, "seconds": 0.9}]
    rows += [{"op": "h2d_pinned", "model": "", "dtype": "", "nbytes": n, "seconds": 1e-5 + n / 20e9}
             for n in (2**20, 2**24, 2**28)]
    t = CalibrationTable.load(_write(tmp_path / "t.csv", rows))
    for (b, c), v in grid.items():
        assert t.lookup("decode_forward", "m", "bf16", batch=b, context=c) == (v, "measured")
    # bilinear inside the grid
    v, src = t.lookup("decode_forward", "m", "bf16", batch=2, context=136)
    expect = (1.0 + (3.0 - 1.0) / 3) * 0.5 + (2.0 + (5.0 - 2.0) / 3) * 0.5
    assert src == "interpolated" and math.isclose(v, expect, rel_tol=1e-12)
    # above the range: linear from the last two points; below: the first point's value
    v, src = t.lookup("decode_forward", "m", "bf16", batch=16, context=16)
    assert src == "extrapolated" and math.isclose(v, 4.0 + (4.0 - 3.0) / 4 * 8)
    v, src = t.lookup("decode_forward", "m", "bf16", batch=1, context=496)
    assert src == "extrapolated" and math.isclose(v, 2.0 + (2.0 - 1.0) / 240 * 240)
    assert t.lookup("decode_forward", "m", "bf16", batch=1, context=4) == (1.0, "extrapolated")
    # a sparse row (context 512, one point) follows the reference row's shape, offset to its point
    assert t.lookup("prefill_forward", "m", "bf16", tokens=64, context=512) == (0.9, "measured")
    v, src = t.lookup("prefill_forward", "m", "bf16", tokens=256, context=512)
    assert src == "extrapolated" and math.isclose(v, 2.56 + (0.9 - 0.64))
    v, src = t.lookup("prefill_forward", "m", "bf16", tokens=64, context=256)
    assert src == "interpolated" and math.isclose(v, (0.64 + 0.9) / 2)
    # copies: hardware-wide rows match any model; bandwidth curve by size
    v, src = t.lookup("h2d_pinned", "other", "fp16", nbytes=2**24)
    assert src == "measured" and math.isclose(v, 1e-5 + 2**24 / 20e9, rel_tol=1e-5)  # 6 digits in the CSV
    assert math.isclose(t.bandwidth_gbps("h2d_pinned"), 2**28 / (1e-5 + 2**28 / 20e9) / 1e9, rel_tol=1e-5)
    # absent op / model / dtype: the caller's roofline
    for args in (("decode_forward", "other", "bf16"), ("decode_forward", "m", "fp16"), ("gemm_o", "m", "bf16")):
        v, src = t.lookup(*args, batch=1, context=16, tokens=1)
        assert src == "roofline" and math.isnan(v)


# ----- the simulator with the committed tables ----------------------------------------------
H100_GRAPHS = ROOT / "conf" / "calibration" / "h100_graphs.csv"


@pytest.mark.parametrize("model", ["gemma3-1b", "tiny-gemma3"])
def test_sim_reproduces_every_whole_step_point_of_the_committed_h100_table(model):
    """The H100 table (CUDA-graph decode and prefill, merged from one profile per model and dtype): every
    decode_step(_mass) point at a graph bucket and every context-0 prefill_step at a length bucket is costed
    exactly as measured; one more prefill item adds exactly the measured pair's margin."""
    from wicore.types import BatchItem, Phase

    t = CalibrationTable.load(H100_GRAPHS)
    dtype = "bf16" if model == "gemma3-1b" else "fp32"
    meta = t.meta_for(model, dtype)
    assert meta["cuda_graphs"] and meta["prefill_graph_buckets"] and "NVIDIA H100" in t.meta["device_name"]
    base = ["hardware=h100", f"model={model}", f"model.dtype={dtype}", "report.enabled=false", "progress=false",
            f"backend.calibration={H100_GRAPHS}", "scheduler.max_num_seqs=64", *SMALL]
    rows = [r for r in t.rows if r["model"] == model and r["dtype"] == dtype]
    val = {(r["op"], r["batch"], r["tokens"], r["context"]): r["seconds"] for r in rows}
    checked = 0
    for mass in (True, False):
        cost = build_sim(make_cfg(*base, f"backend.measure_attention={str(mass).lower()}")).cost
        op = "decode_step_mass" if mass else "decode_step"
        for (o, b, _, c), v in val.items():
            if o == op:
                items = [BatchItem(i, Phase.DECODE, 1, c, True) for i in range(b)]
                assert _close(cost.step(items).compute_s, v), (op, b, c)
                checked += 1
    for (o, _, tok, c), v in val.items():
        if o == "prefill_step" and c == 0:
            assert _close(cost.step([BatchItem(0, Phase.PREFILL, tok, 0, True)]).compute_s, v), tok
            two = [BatchItem(i, Phase.PREFILL, tok, 0, True) for i in range(2)]
            assert _close(cost.step(two).compute_s, val[("prefill_step_pair", 2, tok, 0)]), tok
            checked += 1
    assert checked >= 40
    src = cost.sources()
    assert src["prefill_graph_buckets"] == meta["prefill_graph_buckets"] and src["cuda_graphs"]


@pytest.mark.parametrize("mass", [True, False])
def test_sim_reproduces_every_profiled_decode_point_within_2_percent(mass):
    """B identical requests with prompt C: the second step is one decode of B rows at context C.
    Its duration = decode_forward(_mass)(B, C) + sample(B); the gap before it = step_overhead(B);
    the first step = B prefill forwards of C tokens + sample(B)."""
    op = "decode_forward_mass" if mass else "decode_forward"
    base = make_cfg(*BASE, f"backend.measure_attention={str(mass).lower()}", "workload.prompt.kind=fixed",
                    "workload.output.kind=fixed", "workload.output.value=2")
    points = [(int(r["batch"]), int(r["context"])) for r in _rows() if r["op"] == op]
    assert len(points) >= 12
    for b, c in points:
        cfg = copy.deepcopy(base)
        cfg.workload.num_requests = cfg.workload.concurrency = b
        cfg.workload.prompt.value = c
        setup, steps = _run(cfg)
        assert list(steps["decode_tokens"]) == [0, b] and list(steps["prefill_tokens"]) == [b * c, 0]
        decode = float(steps["duration"].iloc[1])
        assert _close(decode, _value(op, batch=b, context=c) + _value("sample", batch=b)), (b, c, decode)
        gap = float(steps["start"].iloc[1] - steps["end"].iloc[0])
        assert _close(gap, _value("step_overhead", batch=b)), (b, gap)
        prefills = {int(r["tokens"]) for r in _rows() if r["op"] == "prefill_forward" and r["context"] == "0"}
        if c in prefills:
            first = float(steps["duration"].iloc[0])
            expect = b * _value("prefill_forward", tokens=c, context=0) + _value("sample", batch=b)
            assert _close(first, expect), (b, c, first, expect)
        src = setup.cost.sources()["ops"]  # type: ignore[attr-defined]
        assert src[op]["source"] == "measured" and src[op]["lookups"]["measured"] == 1


def test_sim_reproduces_chunked_prefill_points_with_context():
    """Chunked prefill with a budget of T tokens: the chunk at context C is prefill_forward(T, C)."""
    points = [(int(r["tokens"]), int(r["context"])) for r in _rows()
              if r["op"] == "prefill_forward" and int(r["context"]) > 0]
    assert points
    for t, c in points:
        assert c % t == 0
        _, steps = _run(make_cfg(*BASE, "scheduler.batching=chunked_prefill", f"scheduler.max_batched_tokens={t}",
                                 "workload.num_requests=1", "workload.concurrency=1", "workload.prompt.kind=fixed",
                                 f"workload.prompt.value={c + t}", "workload.output.kind=fixed",
                                 "workload.output.value=1"))
        assert list(steps["prefill_tokens"]) == [t] * (c // t + 1)
        last = float(steps["duration"].iloc[-1])  # the last chunk emits the first token
        assert _close(last, _value("prefill_forward", tokens=t, context=c) + _value("sample", batch=1)), (t, c)


def _whole_step_table(tmp_path: Path, graphs: bool,
                      prefill_graphs: bool = False) -> tuple[Path, dict[tuple[str, int, int], float]]:
    """The committed table plus whole-step rows (made-up seconds, distinct from any composition)."""
    rows: list[dict[str, object]] = [dict(r) for r in CalibrationTable.load(TABLE).rows]
    extra: dict[tuple[str, int, int], float] = {}
    for b in (1, 2, 4, 8):
        for c in (16, 64, 256):
            extra[("decode_step", b, c)] = 0.01 + 0.001 * b + 1e-5 * c
    for t in (16, 32, 64, 128):
        extra[("prefill_step", t, 0)] = 0.02 + 1e-4 * t
    base = {"model": "tiny-gemma3", "dtype": "fp32", "device_name": "dev", "batch": 0, "tokens": 0, "context": 0,
            "nbytes": 0, "samples": 5}
    for (op, x, c), v in extra.items():
        coords = {"batch": x} if op == "decode_step" else {"batch": 1, "tokens": x}
        rows.append({**base, "op": op, **coords, "context": c, "seconds": v, "p10_s": v, "p90_s": v})
    meta = json.loads((TABLE.parent / (TABLE.name + ".meta.json")).read_text())
    meta["cuda_graphs"] = graphs
    if prefill_graphs:  # the runtime's length buckets up to the table's max_len (512)
        meta["prefill_graph_buckets"] = [16, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    return CalibrationTable.write(tmp_path / "whole.csv", rows, meta), extra


@pytest.mark.parametrize("graphs", [True, False])
def test_whole_step_rows_replace_the_composition(tmp_path, graphs):
    """With decode_step / prefill_step rows a decode-only step costs decode_step at its batch (at the
    CUDA-graph bucket when the table was measured with graphs) and a prefill step the prefill_step rows
    less the per-item sampling plus one sampling of the step's rows."""
    table, extra = _whole_step_table(tmp_path, graphs)
    sample = {b: _value("sample", batch=b) for b in (1, 2, 4, 8)}
    for b, c in ((3, 64), (4, 16), (1, 256)):
        cfg = make_cfg(*BASE[:-1], f"backend.calibration={table}", "backend.measure_attention=false",
                       f"workload.num_requests={b}", f"workload.concurrency={b}", "workload.prompt.kind=fixed",
                       f"workload.prompt.value={c}", "workload.output.kind=fixed", "workload.output.value=2")
        setup, steps = _run(cfg)
        assert list(steps["decode_tokens"]) == [0, b]
        decode = float(steps["duration"].iloc[1])
        if graphs or b in (1, 2, 4, 8):
            rows = 4 if b == 3 and graphs else b
            expect = extra[("decode_step", rows, c)]
        else:  # B=3 without graphs: halfway between the measured batches 2 and 4
            expect = (extra[("decode_step", 2, c)] + extra[("decode_step", 4, c)]) / 2
        assert _close(decode, expect), (graphs, b, c, decode, expect)
        if ("prefill_step", c, 0) in extra:
            first = float(steps["duration"].iloc[0])
            s3 = sample[b] if b in sample else (sample[2] + sample[4]) / 2
            expect = b * (extra[("prefill_step", c, 0)] - sample[1]) + s3
            assert _close(first, expect), (b, c, first, expect)
        src = setup.cost.sources()  # type: ignore[attr-defined]
        assert src["whole_steps"] == ["prefill_step", "decode_step"] and src["cuda_graphs"] is graphs
        assert src["ops"]["decode_step"]["source"] == "measured"


def test_prefill_graph_tables_cost_a_chunk_at_its_length_bucket(tmp_path):
    """With prefill_graph_buckets in the meta a one-chunk step costs prefill_step at the bucket it pads to (exact at the
    measured bucket), unless the padded chunk would pass max_len (then at its own length, as run eagerly);
    without them the length is interpolated between the measured points."""
    from wicore.types import BatchItem, Phase

    graphed, extra = _whole_step_table(tmp_path / "g", True, prefill_graphs=True)
    plain, _ = _whole_step_table(tmp_path / "p", True)
    cfg = [*BASE[:-1], "backend.measure_attention=false", *SMALL]
    g_cost = build_sim(make_cfg(*cfg, f"backend.calibration={graphed}")).cost
    p_cost = build_sim(make_cfg(*cfg, f"backend.calibration={plain}")).cost

    def cost(model, tokens: int, context: int = 0) -> float:
        return model.step([BatchItem(0, Phase.PREFILL, tokens, context, True)]).compute_s

    for t, bucket in ((20, 32), (16, 16), (33, 64), (100, 128)):
        # 33 pads to 48, which the table lacks: halfway between its 32 and 64 rows
        want = (extra[("prefill_step", 32, 0)] + extra[("prefill_step", 64, 0)]) / 2 if t == 33 else \
            extra[("prefill_step", bucket, 0)]
        assert _close(cost(g_cost, t), want), (t, cost(g_cost, t), want)
    lo, hi = extra[("prefill_step", 16, 0)], extra[("prefill_step", 32, 0)]
    assert _close(cost(p_cost, 20), lo + (hi - lo) * 4 / 16)  # no buckets: interpolated at 20 tokens
    # 30 tokens at context 490 would pad to 32 and end at 522 > max_len 512: costed at 30 tokens
    assert _close(cost(g_cost, 30, 490), cost(p_cost, 30, 490))
    assert g_cost.sources()["prefill_graph_buckets"][:3] == [16, 32, 48]
    assert p_cost.sources()["prefill_graph_buckets"] == []


def test_pair_rows_cost_extra_prefill_items_at_their_margin(tmp_path):
    """With prefill_step_pair rows a step of two equal prefill items costs exactly the measured pair, and a prefill
    item in a step that decodes adds its margin to the decode step (the step's fixed cost is counted once)."""
    from wicore.types import BatchItem, Phase

    table, extra = _whole_step_table(tmp_path, False)
    t = CalibrationTable.load(table)
    pairs = {tok: 1.5 * extra[("prefill_step", tok, 0)] for tok in (16, 32, 64, 128)}
    base = {"model": "tiny-gemma3", "dtype": "fp32", "device_name": "dev", "batch": 2, "context": 0, "nbytes": 0,
            "samples": 5}
    rows = t.rows + [{**base, "op": "prefill_step_pair", "tokens": tok, "seconds": v, "p10_s": v, "p90_s": v}
                     for tok, v in pairs.items()]
    paired = CalibrationTable.write(tmp_path / "pair.csv", rows, t.meta)
    cfg = [*BASE[:-1], "backend.measure_attention=false", *SMALL]
    cost = build_sim(make_cfg(*cfg, f"backend.calibration={paired}")).cost
    plain = build_sim(make_cfg(*cfg, f"backend.calibration={table}")).cost
    s1, s2, s4 = (_value("sample", batch=b) for b in (1, 2, 4))
    for tok in (16, 64):
        two = [BatchItem(i, Phase.PREFILL, tok, 0, True) for i in range(2)]
        assert _close(cost.step(two).compute_s, pairs[tok])
        single = extra[("prefill_step", tok, 0)]
        assert _close(plain.step(two).compute_s, 2 * (single - s1) + s2)  # no pair rows: the old sum
        margin = (pairs[tok] - s2) - (single - s1)
        mixed = [BatchItem(9, Phase.PREFILL, tok, 0, True)] + [BatchItem(i, Phase.DECODE, 1, 64, True) for i in range(3)]
        decode = (extra[("decode_step", 2, 64)] + extra[("decode_step", 4, 64)]) / 2  # 3 rows, no graphs
        s3 = (s2 + s4) / 2
        assert _close(cost.step(mixed).compute_s, decode - s3 + margin + s4), tok
    assert "prefill_step_pair" in cost.sources()["whole_steps"]
    # prefill_step_many (4 items): the third and fourth items add (many - pair) / 2 each, the second the pair margin
    many = {tok: 2.5 * extra[("prefill_step", tok, 0)] for tok in (16, 32, 64, 128)}
    rows4 = rows + [{**base, "op": "prefill_step_many", "batch": 4, "tokens": tok, "seconds": v, "p10_s": v,
                     "p90_s": v} for tok, v in many.items()]
    four = build_sim(make_cfg(*cfg, f"backend.calibration={CalibrationTable.write(tmp_path / 'many.csv', rows4, t.meta)}"))
    s3 = (s2 + s4) / 2
    for tok in (16, 64):
        single = extra[("prefill_step", tok, 0)]
        items = [BatchItem(i, Phase.PREFILL, tok, 0, True) for i in range(4)]
        assert _close(four.cost.step(items).compute_s, many[tok])  # exactly the measured step of 4
        three = items[:3]
        per = ((many[tok] - s4) - (pairs[tok] - s2)) / 2
        assert _close(four.cost.step(three).compute_s, pairs[tok] - s2 + per + s3)
        assert _close(four.cost.step(items[:2]).compute_s, pairs[tok])  # two items: the pair, as before
        assert _close(four.cost.step(items[:1]).compute_s, single)
    assert "prefill_step_many" in four.cost.sources()["whole_steps"]


def test_the_simulator_reads_the_median_unless_told_the_mean(tmp_path):
    """mean_s rows: backend.calibration_statistic=median (default) costs a decode step at its median (seconds),
    mean at its mean; rows without mean_s use the median either way; a bad statistic fails at start-up."""
    from wicore.types import BatchItem, Phase

    table, extra = _whole_step_table(tmp_path, False)
    t = CalibrationTable.load(table)
    rows = [dict(r, mean_s=1.2 * r["seconds"]) if r["op"] == "decode_step" and r["batch"] == 4 else r for r in t.rows]
    path = CalibrationTable.write(tmp_path / "mean.csv", rows, t.meta)
    assert "mean_s" in _rows(path)[0]
    cfg = [*BASE[:-1], "backend.measure_attention=false", *SMALL, f"backend.calibration={path}"]
    items = {b: [BatchItem(i, Phase.DECODE, 1, 64, True) for i in range(b)] for b in (2, 4)}
    mean = build_sim(make_cfg(*cfg, "backend.calibration_statistic=mean")).cost
    median = build_sim(make_cfg(*cfg)).cost
    assert _close(mean.step(items[4]).compute_s, 1.2 * extra[("decode_step", 4, 64)])
    assert _close(median.step(items[4]).compute_s, extra[("decode_step", 4, 64)])
    assert _close(mean.step(items[2]).compute_s, median.step(items[2]).compute_s)  # no mean_s in that row
    assert mean.sources()["table"]["statistic"] == "mean" and median.sources()["table"]["statistic"] == "median"
    with pytest.raises(ConfigError, match="calibration_statistic"):
        build_sim(make_cfg(*cfg, "backend.calibration_statistic=mode"))


def test_absent_model_falls_back_to_the_roofline_and_says_so():
    common = ["hardware=h100", "model=gemma3-1b", "workload.num_requests=20", "workload.concurrency=4",
              "report.enabled=false", "progress=false"]
    plain, a = _run(make_cfg(*common))
    calib, b = _run(make_cfg(*common, f"backend.calibration={TABLE}"))
    assert a["duration"].tolist() == b["duration"].tolist()  # bit for bit the roofline run
    src = calib.cost.sources()  # type: ignore[attr-defined]
    assert src["calibrated"] and src["table"]["path"] == str(TABLE)
    assert {v["source"] for v in src["ops"].values()} == {"roofline"}
    assert src["ops"]["decode_forward_mass"]["lookups"]["roofline"] > 0
    none = roofline_sources(plain.model)
    assert not none["calibrated"] and {v["source"] for v in none["ops"].values()} == {"roofline"}
    from wicore.report import _cost_sources_line
    assert _cost_sources_line(none).startswith("Costs: every op from the datasheet roofline (no calibration table)")
    assert "has no timings for gemma3-1b bf16" in _cost_sources_line(src)


def test_calibrated_run_writes_cost_sources_and_the_report_line(tmp_path):
    from wicore.report import _cost_sources_line

    cfg = make_cfg(*BASE, "workload.num_requests=12", "workload.concurrency=4", "workload.prompt.kind=uniform",
                   "workload.prompt.low=10", "workload.prompt.high=300", "workload.output.kind=fixed",
                   "workload.output.value=5")
    run_sim(cfg, tmp_path / "run")
    src = json.loads((tmp_path / "run" / "cost_sources.json").read_text())
    ops = src["ops"]
    assert {k: v["source"] for k, v in ops.items()} == {k: "measured" for k in
                                                        ("prefill_forward", "decode_forward_mass", "sample",
                                                         "step_overhead")}
    assert ops["prefill_forward"]["lookups"]["interpolated"] + ops["prefill_forward"]["lookups"]["extrapolated"] > 0
    assert src["links"]["pcie.bandwidth_gbps"]["source"] == "datasheet"  # a CPU table has no pinned copies
    line = _cost_sources_line(src)  # the report's line (write_report puts it under the run table)
    assert line.startswith("Costs: measured") and "decode_forward_mass" in line and str(TABLE) in line
    assert "datasheet roofline" not in line
    src["ops"]["sample"]["source"] = "roofline"
    assert _cost_sources_line(src).endswith("; datasheet roofline: sample; details in cost_sources.json.")


def test_every_forward_streams_the_offloaded_layers_again():
    """A static placement that streams every layer: the real runtime copies them in each forward, so a
    step of k forwards moves k times the bytes (the roofline sim moves them once per step)."""
    tight = ["hardware.gpu.memory_gib=0.0006", "memory.workspace_gib=0", "memory.kv_min_gib=0.00008",
             "workload.num_requests=3", "workload.concurrency=3", "workload.prompt.kind=fixed",
             "workload.prompt.value=16", "workload.output.kind=fixed", "workload.output.value=2"]
    runs = {}
    for name, extra in (("roofline", []), ("calibrated", [f"backend.calibration={TABLE}"])):
        setup, steps = _run(make_cfg(*[o for o in BASE if not o.startswith("backend.")], *tight, *extra))
        per_step = setup.placements[0].offloaded_bytes
        assert per_step > 0
        runs[name] = (steps, per_step)
    steps, per_step = runs["roofline"]
    assert (steps["link_bytes"] == per_step).all()
    steps, per_step = runs["calibrated"]
    forwards = [n if p else 1 for n, p in zip(steps["batch_size"], steps["prefill_tokens"])]
    assert steps["link_bytes"].tolist() == [k * per_step for k in forwards] and max(forwards) == 3
    assert (steps["stall_s"] >= 0).all()


def test_a_table_profiled_under_the_budget_holds_the_streaming_in_its_steps(tmp_path):
    """Steps timed with the layers streamed (meta streamed_layers) already hold the copies: the simulator does not
    gate them on modelled copies again. A decode step lasts its measured time with no stall, and moves the streamed
    bytes, reported as one fetch over the step. The same rows without that meta stall on a slow link."""
    table, extra = _whole_step_table(tmp_path, True)
    meta_path = Path(str(table) + ".meta.json")
    meta = json.loads(meta_path.read_text())
    plain = CalibrationTable.write(tmp_path / "plain.csv", CalibrationTable.load(table).rows, meta)
    meta["streamed_layers"] = [0, 1, 2, 3, 4, 5]
    meta_path.write_text(json.dumps(meta))
    tight = ["hardware.gpu.memory_gib=0.0006", "memory.workspace_gib=0", "memory.kv_min_gib=0.00008",
             "hardware.pcie.bandwidth_gbps=0.05", "backend.measure_attention=false", "workload.num_requests=3",
             "workload.concurrency=3", "workload.prompt.kind=fixed", "workload.prompt.value=16",
             "workload.output.kind=fixed", "workload.output.value=3"]
    runs = {}
    for name, t in (("measured", table), ("modelled", plain)):
        cfg = make_cfg(*[o for o in BASE if not o.startswith("backend.")], *tight, f"backend.calibration={t}")
        setup, steps = _run(cfg)
        runs[name] = (setup, steps[steps["prefill_tokens"] == 0])
    setup, dec = runs["measured"]
    per_step = setup.placements[0].offloaded_bytes  # type: ignore[attr-defined]
    assert per_step > 0 and len(dec) == 2
    # batch 3 runs the graph bucket 4; contexts 16 and 17 (1e-5 s a token: within 0.1 %)
    assert all(_close(d, extra[("decode_step", 4, 16)], 0.001) for d in dec["duration"])
    assert (dec["stall_s"] == 0).all() and (dec["link_bytes"] == per_step).all()
    assert setup.cost.sources()["weight_streaming"].startswith("measured")  # type: ignore[attr-defined]
    _, slow = runs["modelled"]
    assert (slow["stall_s"] > 0).all() and (slow["duration"] > dec["duration"].max()).all()


def test_measured_pinned_copies_set_the_link_bandwidth(tmp_path):
    rows = [dict(r) for r in _rows()]
    for n in (2**20, 2**26):
        rows.append({**rows[0], "op": "h2d_pinned", "model": "", "dtype": "", "batch": 0, "context": 0,
                     "nbytes": n, "seconds": n / 12e9, "p10_s": n / 12e9, "p90_s": n / 12e9})
    table = CalibrationTable.write(tmp_path / "pinned.csv", [{**r, **{k: float(r[k]) for k in
                                                                       ("seconds", "p10_s", "p90_s")}}
                                                               for r in rows], {})
    setup = build_sim(make_cfg(*BASE[:-1], *SMALL, f"+hardware.calibration={table}"))  # the profile's table
    assert math.isclose(setup.hw.pcie.bandwidth_gbps, 12.0, rel_tol=1e-5)
    assert setup.cost.sources()["links"]["pcie.bandwidth_gbps"]["source"] == "measured h2d_pinned"  # type: ignore[attr-defined]


@pytest.mark.parametrize("override, needle", [
    ("backend.calibration=no/such/table.csv", "backend.calibration: calibration table 'no/such/table.csv' not found"),
    ("hardware=h100x2", "tp=2"),
])
def test_bad_calibration_config_fails_at_start(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("/", "/")):
        build_sim(make_cfg(*BASE, *SMALL, override))


# ----- the profiler ---------------------------------------------------------------------------
def test_profiler_quick_on_cpu_writes_a_valid_table(tmp_path, torch_one_thread):
    from wicore.cli import main

    out = tmp_path / "calib.csv"
    assert main(["profile", "--model", "tiny-gemma3", "--device", "cpu", "--out", str(out), "--quick",
                 "--threads", "1"]) == 0
    t = CalibrationTable.load(out)
    ops = set(t.ops())
    assert {"decode_forward", "decode_forward_mass", "prefill_forward", "sample", "step_overhead",
            "engine_overhead", "decode_step", "decode_step_mass", "prefill_step", "gemm_qkv",
            "attn_decode", "attn_prefill", "h2d_pageable", "d2d", "disk_read"} <= ops
    rows = t.rows
    assert all(r["seconds"] > 0 and r["p10_s"] <= r["seconds"] <= r["p90_s"] for r in rows)
    decode = {(r["batch"], r["context"]) for r in rows if r["op"] == "decode_forward"}
    assert decode == {(b, c) for b in (1, 2, 4, 8) for c in (16, 64, 256)}
    assert t.meta["device"] == "cpu" and t.meta["quick"] and "h2d_pinned" in t.meta["skipped"]
    assert t.meta["notes"]["execute_check"] and t.meta["profile_s"] < 20


def test_profiler_with_prefill_graphs_measures_every_length_bucket(tmp_path, torch_one_thread):
    """--prefill-graphs: prefill_step runs through the backend's prefill graphs at every length bucket that fits
    the slot (the context points as well), and the meta lists the buckets the simulator then pads to."""
    from dataclasses import replace

    from wicore.runtime.buckets import prefill_buckets
    from wicore.runtime.profiler import ProfileGrid, profile

    grid = replace(ProfileGrid.quick(), primitives=False, decode_batches=(1,), decode_contexts=(16,),
                   prefill_tokens=(16,), prefill_context_points=((16, 64),), overhead_batches=(1,), reps=2,
                   check_points=())
    out = profile("tiny-gemma3", "cpu", tmp_path / "p.csv", grid, max_len=128, prefill_graphs=True,
                  cuda_graphs=True, log=lambda m: None)
    t = CalibrationTable.load(out)
    assert t.meta["prefill_graph_buckets"] == list(prefill_buckets(128)) == [16, 32, 48, 64, 96, 128]
    steps = {(r["tokens"], r["context"]) for r in t.rows if r["op"] == "prefill_step"}
    assert steps == {(16, 0), (32, 0), (48, 0), (64, 0), (96, 0), (16, 64)}  # 128 + the timed tokens > max_len
    pairs = {(r["tokens"], r["context"]) for r in t.rows if r["op"] == "prefill_step_pair"}
    assert pairs == steps and all(r["mean_s"] > 0 for r in t.rows)


def test_interleaved_timing_spreads_rounds_and_warms_up_once():
    from wicore.runtime.timing import interleaved

    calls: list[tuple[str, int, int]] = []

    def timer(p: str, n: int, warmup: int) -> list[float]:
        calls.append((p, n, warmup))
        return [float(len(calls))] * n

    out = interleaved(["a", "b", "c"], timer, reps=10, warmup=2, rounds=4, seed=1)
    assert {p: len(v) for p, v in out.items()} == {"a": 10, "b": 10, "c": 10}
    assert [c for c in calls if c[2]] == [("a", 3, 2), ("b", 3, 2), ("c", 3, 2)]  # warm-up on the first visit
    orders = ["".join(p for p, _, _ in calls[i:i + 3]) for i in range(0, 12, 3)]
    assert len(set(orders)) > 1  # later rounds visit the points in shuffled orders
    assert interleaved(["x"], timer, reps=3, warmup=0, rounds=9)["x"] and len(calls) == 15  # rounds <= reps


def test_profiler_under_a_gpu_budget_streams_layers_in_its_steps(tmp_path, torch_one_thread):
    """--gpu-budget-gib: the layers the placement leaves off the budget are streamed while profiling, so the
    whole steps include the streaming; the meta names them."""
    from dataclasses import replace

    import yaml

    from wicore.model.spec import ModelSpec
    from wicore.runtime.profiler import ProfileGrid, profile

    spec = ModelSpec.from_config(yaml.safe_load((ROOT / "conf/model/tiny-gemma3.yaml").read_text()) | {"dtype": "fp32"})
    fixed = 0.5 * 2**30 + spec.embedding_bytes + 2 * spec.layer_bytes + 2 * 2**30
    budget = (fixed + 1.5 * spec.layer_bytes) / 0.92 / 2**30  # one resident layer (default memory config)
    grid = replace(ProfileGrid.quick(), primitives=False, decode_batches=(1, 2), decode_contexts=(16, 64),
                   prefill_tokens=(16, 32), prefill_context_points=(), overhead_batches=(1,), reps=2,
                   check_points=((1, 16),))
    out = profile(spec, "cpu", tmp_path / "s.csv", grid, gpu_budget_gib=round(budget, 9), log=lambda m: None)
    t = CalibrationTable.load(out)
    assert t.meta["streamed_layers"] == list(range(1, spec.num_layers)) and t.meta["gpu_budget_gib"]
    assert {"decode_step", "prefill_step", "decode_forward"} <= set(t.ops())
    assert t.meta["stream_schedule"] == "cycle" and not t.meta["cuda_graphs"]
    # with graphs, as runs with backend.cuda_graphs / prefill_graphs stream: on the graph-safe schedule
    out = profile(spec, "cpu", tmp_path / "g.csv", grid, gpu_budget_gib=round(budget, 9), cuda_graphs=True,
                  prefill_graphs=True, max_len=128, log=lambda m: None)
    g = CalibrationTable.load(out)
    assert g.meta["stream_schedule"] == "forward" and g.meta["cuda_graphs"] and g.meta["prefill_graph_buckets"]
    assert g.meta["streamed_layers"] == t.meta["streamed_layers"]
    assert {"decode_step", "prefill_step", "prefill_step_pair"} <= set(g.ops())


def test_profile_grid_overrides_from_the_command_line(capsys):
    from wicore.cli import main
    from wicore.runtime.profiler import ProfileGrid, grid_with

    g = grid_with(ProfileGrid(), ["decode_batches=1,4,16", "reps=10", "prefill_context_points=128:256,64:1024",
                                  "check_points=", "steps=false"])
    assert (g.decode_batches, g.reps, g.prefill_context_points, g.check_points, g.steps) == (
        (1, 4, 16), 10, ((128, 256), (64, 1024)), (), False)
    assert main(["profile", "--model", "tiny-gemma3", "--device", "cpu", "--out", "/tmp/x.csv",
                 "--grid", "decode_batch=1"]) == 2
    assert "must be FIELD=VALUES" in capsys.readouterr().err


def test_whole_steps_are_measured_up_to_the_longest_context_that_fits(tmp_path, torch_one_thread):
    """A grid context past max_len minus the tokens the timed steps append is lowered to fit, not dropped:
    runs that decode near max_len interpolate up to a measured step."""
    from wicore.runtime.profiler import ProfileGrid, profile, step_contexts

    assert step_contexts((16, 64, 2048), 2048, 17) == [16, 64, 2031]
    assert step_contexts((16, 2031, 4096), 2048, 17) == [16, 2031]
    assert step_contexts((16,), 8, 17) == []
    grid = ProfileGrid(decode_batches=(1, 2), decode_contexts=(16, 128), prefill_tokens=(16,),
                       prefill_context_points=(), overhead_batches=(1,), overhead_steps=3, primitives=False,
                       check_points=(), rounds=1, reps=2, warmup=1)
    t = CalibrationTable.load(profile("tiny-gemma3", "cpu", tmp_path / "t.csv", grid, max_len=128, log=lambda m: None))
    for op in ("decode_step", "decode_step_mass"):
        assert {(r["batch"], r["context"]) for r in t.rows if r["op"] == op} == {(b, c) for b in (1, 2)
                                                                                for c in (16, 123)}
    assert {r["context"] for r in t.rows if r["op"] == "decode_forward"} == {16, 127}


def test_engine_driven_decode_steps_time_full_batches_centred_on_the_context(tmp_path, torch_one_thread):
    """engine_decode_times drives the real engine and driver: per (batch, context) it returns the durations of
    `steps` decode steps of the whole batch after `warmup` of them, whose contexts lie around the point; the
    profile grid's engine_steps writes them as decode_step(_mass) rows."""
    import time as _time

    from wicore.model.spec import ModelSpec
    from wicore.runtime.profile_overhead import _NullBackend, engine_decode_times
    from wicore.runtime.profiler import ProfileGrid, grid_with, profile

    seen: list[tuple[int, list[int]]] = []

    class Spy(_NullBackend):
        def execute(self, plan):
            res = super().execute(plan)
            res.end = res.start + 0.001 * len(plan.items)  # a step of B rows "takes" B ms
            if all(it.phase.value == "decode" for it in plan.items):
                seen.append((len(plan.items), [it.context_len for it in plan.items]))
            return res

    spec = ModelSpec.from_config(__import__("yaml").safe_load((ROOT / "conf/model/tiny-gemma3.yaml").read_text()))
    times = engine_decode_times(Spy(_time.perf_counter()), spec, [1, 4], [64], steps=10, warmup=2)
    assert set(times) == {(1, 64), (4, 64)}
    assert times[(4, 64)] == pytest.approx([0.004] * 10) and times[(1, 64)] == pytest.approx([0.001] * 10)
    full = [ctx for n, ctx in seen if n == 4][2:12]  # the timed steps of batch 4
    assert len(full) == 10 and min(min(c) for c in full) <= 64 <= max(max(c) for c in full)
    assert abs(sum(sum(c) for c in full) / 40 - 64) <= 2

    assert grid_with(ProfileGrid(), ["engine_steps=true"]).engine_steps
    grid = ProfileGrid(decode_batches=(1, 2), decode_contexts=(16, 64), prefill_tokens=(16,),
                       prefill_context_points=(), overhead_batches=(1,), overhead_steps=3, primitives=False,
                       check_points=(), rounds=1, reps=3, warmup=1, engine_steps=True)
    t = CalibrationTable.load(profile("tiny-gemma3", "cpu", tmp_path / "e.csv", grid, max_len=128, log=lambda m: None))
    for op in ("decode_step", "decode_step_mass"):
        rows = [r for r in t.rows if r["op"] == op]
        assert {(r["batch"], r["context"]) for r in rows} == {(b, c) for b in (1, 2) for c in (16, 64)}
        assert all(r["samples"] == 3 and r["seconds"] > 0 for r in rows)
    assert t.meta["grid"]["engine_steps"] is True


def test_admission_gaps_are_measured_and_charged_before_steps_that_admit(tmp_path):
    """measure_admit_gaps_on times the host gap before each step that admits `batch` new requests right after as
    many finished (closed loop); the calibrated simulator charges admit_overhead at the number a step admits
    before it, and step_overhead before the others."""
    import time as _time

    from wicore.model.checkpoint import load_spec_file
    from wicore.runtime.profile_overhead import _NullBackend, measure_admit_gaps_on

    class SlowAdmission(_NullBackend):
        def add_request(self, req):
            _time.sleep(0.003)  # 3 ms of host work per admitted request

    spec = load_spec_file(ROOT / "conf" / "model" / "tiny-gemma3.yaml")
    gaps = measure_admit_gaps_on(SlowAdmission(_time.perf_counter()), spec, 2, rounds=4, warmup=1)
    assert len(gaps) == 4 and all(0.006 <= g < 0.05 for g in gaps)  # two admissions of 3 ms each, per gap

    rows: list[dict[str, object]] = [dict(r) for r in CalibrationTable.load(TABLE).rows]
    base = {"model": "tiny-gemma3", "dtype": "fp32", "device_name": "dev", "tokens": 0, "context": 0, "nbytes": 0,
            "samples": 5}
    admit = {1: 0.004, 2: 0.005, 4: 0.007}
    rows += [{**base, "op": "admit_overhead", "batch": b, "seconds": v, "p10_s": v, "p90_s": v}
             for b, v in admit.items()]
    table = CalibrationTable.write(tmp_path / "admit.csv", rows,
                                   json.loads((TABLE.parent / (TABLE.name + ".meta.json")).read_text()))
    setup, steps = _run(make_cfg(*BASE[:-1], f"backend.calibration={table}", "workload.num_requests=6",
                                 "workload.concurrency=2", "workload.prompt.kind=fixed", "workload.prompt.value=16",
                                 "workload.output.kind=fixed", "workload.output.value=3"))
    gap = (steps["start"] - steps["end"].shift(1)).tolist()
    gap[0] = float(steps["start"].iloc[0])  # before the first step: from the clock's start
    admits = (steps["prefill_tokens"] // 16).tolist()  # every prefill item here is a whole 16-token prompt
    assert sum(admits) == 6 and any(a == 2 for a in admits)
    for g, a, n in zip(gap, admits, steps["batch_size"].tolist()):
        want = admit[a] if a else _value("step_overhead", batch=n)
        assert _close(g, want, 1e-6), (g, a, n)
    src = setup.cost.sources()  # type: ignore[attr-defined]
    assert src["ops"]["admit_overhead"]["source"] == "measured"


def test_merge_tables_keeps_each_models_run_shape(tmp_path):
    """merge-tables: rows concatenated; the run-shape meta a model was measured with (graphs, max_len, ...) stays
    that model's (meta_for), at the top level only where the inputs agree; clashes are refused."""
    from sim.calibration import merge_tables
    from wicore.cli import main

    a = _write(tmp_path / "a.csv", [{"op": "decode_forward", "model": "m", "batch": 1, "seconds": 0.01}])
    b = _write(tmp_path / "b.csv", [{"op": "decode_forward", "model": "n", "batch": 1, "seconds": 0.02}])
    for path, meta in ((a, {"max_len": 2048, "cuda_graphs": True, "prefill_graph_buckets": [16, 32]}),
                       (b, {"max_len": 512, "cuda_graphs": True})):
        (tmp_path / (path.name + ".meta.json")).write_text(json.dumps(meta))
    assert main(["merge-tables", str(tmp_path / "ab.csv"), str(a), str(b)]) == 0
    t = CalibrationTable.load(tmp_path / "ab.csv")
    assert len(t.rows) == 2 and t.models() == [("m", "bf16"), ("n", "bf16")]
    assert t.meta["cuda_graphs"] is True and "max_len" not in t.meta and len(t.meta["merged_from"]) == 2
    assert t.meta_for("m", "bf16")["max_len"] == 2048 and t.meta_for("m", "bf16")["prefill_graph_buckets"] == [16, 32]
    assert t.meta_for("n", "bf16")["max_len"] == 512 and t.meta_for("n", "bf16")["prefill_graph_buckets"] is None
    with pytest.raises(ConfigError, match="two rows"):
        merge_tables([a, a], tmp_path / "x.csv")
    c = _write(tmp_path / "c.csv", [{"op": "sample", "model": "m", "batch": 1, "seconds": 0.001}])
    (tmp_path / "c.csv.meta.json").write_text(json.dumps({"max_len": 1024}))
    with pytest.raises(ConfigError, match="measured differently"):
        merge_tables([a, c], tmp_path / "x.csv")
    assert main(["merge-tables", str(tmp_path / "x.csv"), str(a), str(c)]) == 2


@pytest.mark.parametrize("engine", [False, True], ids=["backend-steps", "engine-steps-stage-graphs"])
def test_pipeline_profile_costs_pp2_runs_with_its_whole_steps(tmp_path, torch_one_thread, engine):
    """profile --pp 2 times whole steps through the pipeline backend (two ranks on the CPU here); the calibrated
    simulator then takes it for parallel=pp runs, a decode step costing exactly the measured step, and refuses
    it for one GPU (and a one-GPU table for a pipeline)."""
    from dataclasses import replace

    from wicore.runtime.profiler import ProfileGrid, profile
    from wicore.types import BatchItem, Phase

    grid = replace(ProfileGrid.quick(), decode_batches=(1, 2), decode_contexts=(16,), prefill_tokens=(16,),
                   prefill_context_points=(), reps=2, warmup=1, rounds=1, overhead_batches=(1, 2, 4), overhead_steps=4,
                   engine_steps=engine, prefill_many=3)
    path = profile("tiny-gemma3", "cpu", tmp_path / "pp2.csv", grid, pp=2, log=lambda m: None, cuda_graphs=engine)
    t = CalibrationTable.load(path)
    assert t.meta["pp"] == 2 and t.meta["devices"] == ["cpu", "cpu"] and t.meta["cuda_graphs"] is engine
    assert set(t.ops()) == {"decode_step", "decode_step_mass", "prefill_step", "prefill_step_pair", "prefill_step_many",
                            "step_overhead", "admit_overhead"}
    assert {r["batch"] for r in t.rows if r["op"] == "prefill_step_many"} == {grid.prefill_many}
    assert {r["batch"] for r in t.rows if r["op"] == "step_overhead"} == {1, 2}
    assert {r["batch"] for r in t.rows if r["op"] == "admit_overhead"} == {1, 2}
    pp_cfg = ["hardware=h100x2", "parallel=pp", "model=tiny-gemma3", "report.enabled=false", "progress=false",
              f"backend.calibration={path}", *SMALL]
    cost = build_sim(make_cfg(*pp_cfg)).cost
    rows = {(r["op"], r["batch"], r["tokens"], r["context"]): r["seconds"] for r in t.rows}
    two = [BatchItem(i, Phase.DECODE, 1, 16, True) for i in range(2)]
    assert _close(cost.step(two).compute_s, rows[("decode_step_mass", 2, 0, 16)])
    pair = [BatchItem(i, Phase.PREFILL, 16, 0, True) for i in range(2)]
    single, both = rows[("prefill_step", 1, 16, 0)], rows[("prefill_step_pair", 2, 16, 0)]
    # the measured pair, unless timing noise put it below 1.1x the single step (a margin is held at >= 10 %)
    assert _close(cost.step(pair).compute_s, single + max(both - single, 0.1 * single))
    assert cost.sources()["pp"] == 2
    with pytest.raises(ConfigError, match="measured with pp=2.*without --pp"):
        build_sim(make_cfg(*BASE[:-1], f"backend.calibration={path}", *SMALL))
    with pytest.raises(ConfigError, match="--pp 2"):
        build_sim(make_cfg(*pp_cfg[:-len(SMALL) - 1], f"backend.calibration={TABLE}", *SMALL))
    with pytest.raises(ConfigError, match="drop --prefill-graphs and --gpu-budget-gib"):
        profile("tiny-gemma3", "cpu", tmp_path / "x.csv", grid, pp=2, prefill_graphs=True)
