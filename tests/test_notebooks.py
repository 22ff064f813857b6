"""The notebooks run end to end (nbclient) on small result folders made here, so they cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.run import run_sim
from experiments.validate import Options, load_grid, run_grid, select
from tests.conftest import ROOT, make_cfg
from wicore.results import write_overrides

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = ROOT / "notebooks"
QUIET = ["report.enabled=false", "progress=false"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, torch_one_thread: None) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("notebook_results")
    sweep = base / "sweep"  # a batching-policy sweep, laid out like a Hydra multirun
    for i, policy in enumerate(("static", "continuous", "chunked_prefill")):
        ov = ["hardware=h100", "model=gemma3-1b", f"scheduler.batching={policy}", "workload.num_requests=12",
              "workload.concurrency=4"]
        job = sweep / f"{i}_scheduler.batching={policy}"
        run_sim(make_cfg(*ov, *QUIET), job)
        write_overrides(job, ov)
    hmt = base / "hmt"  # tiered weights and KV pages: tiers.parquet + blocks.parquet
    run_sim(make_cfg("hardware=t10x2", "model=gemma3-27b", "memory=hmt", "memory.kv.tiering=true",
                     "memory.policy=lru", "workload.num_requests=6", "workload.concurrency=3",
                     "workload.prompt.kind=fixed", "workload.prompt.value=64", "workload.output.kind=fixed",
                     "workload.output.value=16", *QUIET), hmt)
    val = base / "validation"  # one sim + torch pair of the grid
    res = run_grid(select(load_grid(), ["tiny-c1-short"]), ["torch", "sim"], val,
                   Options(extra=("workload.num_requests=3",), warmup=False), log=lambda _: None)
    assert [r.status for r in res] == ["ok", "ok"]
    return {"sim_vs_real": val, "policy_sweep": sweep, "memory_tiers": hmt}


def _execute(name: str, results: Path, monkeypatch: pytest.MonkeyPatch) -> object:
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    monkeypatch.setenv("WICORE_RESULTS", str(results))  # the kernel inherits the environment
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def _outputs(nb: object) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]  # type: ignore[attr-defined]


@pytest.mark.parametrize("name, images", [("sim_vs_real", 3), ("policy_sweep", 1), ("memory_tiers", 2)])
def test_notebook_runs_and_draws_its_figures(name, images, folders, monkeypatch):
    nb = _execute(name, folders[name], monkeypatch)
    outs = _outputs(nb)
    assert not [o for o in outs if o.get("output_type") == "error"]
    pngs = [o for o in outs if "image/png" in o.get("data", {})]
    assert len(pngs) == images
    text = "\n".join(str(o.get("data", {}).get("text/plain", "")) + str(o.get("text", "")) for o in outs)
    if name == "sim_vs_real":
        assert "ttft_p50" in text and "decode-only steps, batch 1" in text
    elif name == "policy_sweep":
        assert "chunked_prefill" in text and "static" in text
    else:
        assert "served_from_cpu" in text


@pytest.mark.parametrize("name", ["sim_vs_real", "policy_sweep", "memory_tiers"])
def test_committed_notebooks_have_no_outputs(name):
    nb = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
