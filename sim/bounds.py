"""Physical limits of a configuration: the roofline at datasheet peaks.

The same cost model as the simulator with every efficiency factor set to 1
and no launch overhead, plus the weight-streaming floor when weights are
offloaded (every step must move the streamed bytes over PCIe). For the mean
request of the workload, no schedule beats them on that hardware with that
placement (a workload whose requests vary in length can run a few more
sequences at once than the mean-length estimate below, so the throughput and
concurrency figures are estimates at the mean, not strict bounds):

* first-token latency >= prefill of the median prompt alone;
* throughput <= B * O / (t_prefill(B prompts) + O * t_decode(B)) for the
  largest batch B the KV pool holds (at the workload's mean lengths);
* concurrency ~ KV pool tokens / (mean prompt + mean output) (an estimate at the
  mean lengths, not a strict bound: a mix of short requests fits more);
* memory utilisation <= the fraction of GPU memory the engine may use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sim.cost_model import CostModel
from wicore.hal import HardwareSpec
from wicore.memory.placement import StaticPlacement
from wicore.model.spec import ModelSpec
from wicore.types import BatchItem, Phase


@dataclass(frozen=True)
class Bounds:
    ttft_s: float
    throughput_tok_s: float
    best_batch: int
    concurrency: float
    memory_utilisation: float
    decode_step_s: float
    stream_s: float


def ideal_hardware(hw: HardwareSpec) -> HardwareSpec:
    gpu = dataclasses.replace(hw.gpu, compute_efficiency=1.0, bandwidth_efficiency=1.0, launch_overhead_us=0.0)
    return dataclasses.replace(hw, gpu=gpu)


def compute_bounds(model: ModelSpec, hw: HardwareSpec, tp: int, pp: int, replicas: int,
                   placement: StaticPlacement, mean_prompt: float, median_prompt: float,
                   mean_output: float, max_num_seqs: int) -> Bounds:
    cost = CostModel(model, ideal_hardware(hw), tp=tp, pp=pp)
    # streaming floor: every step moves each GPU's streamed bytes over its own link
    link_bw = hw.pcie.bandwidth_gbps * 1e9
    if hw.shared_upstream_gbps > 0:
        link_bw = min(link_bw, hw.shared_upstream_gbps * 1e9 / max(len(placement.placements), 1))
    stream_s = placement.stream_floor_s(link_bw)

    def step_s(items: list[BatchItem]) -> float:
        return max(cost.step(items).total_s, stream_s)

    prompt, out = max(1, round(mean_prompt)), max(1, round(mean_output))
    ttft = step_s([BatchItem(0, Phase.PREFILL, max(1, round(median_prompt)), 0, True)])
    per_seq_tokens = prompt + out
    fit = placement.num_pages * placement.page_tokens / per_seq_tokens
    concurrency = fit * replicas
    best, best_b = 0.0, 1
    b_max = max(1, min(int(fit), max_num_seqs))
    decode_step = 0.0
    for b in sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, b_max}):
        if b > b_max:
            continue
        prefill = step_s([BatchItem(i, Phase.PREFILL, prompt, 0, True) for i in range(b)])
        dec = step_s([BatchItem(i, Phase.DECODE, 1, prompt + out // 2, True) for i in range(b)])
        tput = b * out / (prefill + out * dec)
        if tput > best:
            best, best_b, decode_step = tput, b, dec
    usable = sum(p.usable_bytes for p in placement.placements) / sum(p.capacity_bytes for p in placement.placements)
    return Bounds(ttft, best * replicas, best_b, concurrency, usable, decode_step, stream_s)
