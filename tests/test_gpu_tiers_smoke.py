"""benchmarks/gpu_tiers.py: its helpers, and its --cpu-smoke mode (every section's code path, tiny shapes)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from benchmarks import gpu_tiers  # noqa: E402


def test_kv_pages_of_the_preempting_runs_and_the_token_comparison():
    # 16 requests of 256 + 64 tokens need 20 pages of 16 each at full length: 80% of 320 pages
    assert gpu_tiers.swap_kv_pages(16, 256, 64, 16, 0.8) == 256
    assert gpu_tiers.swap_kv_pages(4, 30, 10, 8, 0.01) == 5  # never below one request's pages
    ref = {0: [1, 2, 3], 1: [4, 5, 6], 2: [7]}
    same = gpu_tiers.compare_tokens(dict(ref), ref)
    assert same["all_identical"] and same["first_divergence"] is None and same["matching_tokens"] == 7
    diff = gpu_tiers.compare_tokens({0: [1, 2, 3], 1: [4, 9, 6]}, ref)
    assert not diff["all_identical"] and diff["identical_requests"] == 1 and diff["first_divergence"] == 0
    assert diff["missing_requests"] == [2] and diff["matching_tokens"] == 5
    assert gpu_tiers.failures({"a": {"x": {"error": "boom"}, "y": {}}, "b": {"skipped": "t"}}) == ["a.x"]


@pytest.mark.usefixtures("torch_one_thread")
def test_cpu_smoke_runs_every_section_with_matching_tokens_and_removes_its_files(tmp_path):
    out, drive = tmp_path / "out", tmp_path / "drive"
    assert gpu_tiers.main(["--cpu-smoke", "--out", str(out), "--nvme-dir", str(drive)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "table.md").read_text().count("|") > 100
    assert res["meta"]["failed_sections"] == [] and res["meta"]["work_dir_removed"]
    assert list(drive.iterdir()) == []  # every file written to the drive directory is gone
    kv = res["kv_swap"]
    for mode in ("eager", "graphs"):
        swap, rec = kv[f"{mode}_swap"], kv[f"{mode}_recompute"]
        assert kv[f"{mode}_nopreempt"]["preemptions"] == 0
        assert swap["preemptions"] > 0 and swap["swaps_out"] == swap["swaps_in"] > 0
        assert swap["swap_out_bytes"] == swap["swap_in_bytes"] > 0 and swap["swap_copy_s"] > 0
        assert swap["steps_link_bytes"] == swap["swap_ops_bytes"] == 2 * swap["swap_out_bytes"]
        assert swap["kv_check"]["ok"] and swap["kv_check"]["swap_ins_checked"] == swap["swaps_in"]
        assert rec["preemptions"] > 0 and rec["swaps_out"] == 0
        for r in (swap, rec):
            assert r["tokens_vs_nopreempt"]["all_identical"], r["tokens_vs_nopreempt"]
        assert "_tokens" not in swap  # private keys stay out of results.json
    tier = res["nvme_tier"]
    assert tier["tokens_nvme_vs_host"]["all_identical"] and tier["store_files_left"] == 0
    assert tier["nvme_int4"]["source"] == "nvme" and tier["nvme_int4"]["disk_bytes"] > 0
    assert tier["host_int4"]["disk_bytes"] == 0 and tier["nvme_int4"]["host_bytes"] == 0
    assert tier["nvme_int4"]["disk_io"] in ("O_DIRECT", "buffered+POSIX_FADV_DONTNEED", "buffered (page cache)")
    scale = res["nvme_scale"]
    assert scale["nvme_int4"]["disk_bytes_per_token"] > 0 and scale["host_int4"]["disk_bytes"] == 0
    assert scale["tokens_nvme_vs_host"]["matching"] == scale["tokens_nvme_vs_host"]["compared"] > 0
