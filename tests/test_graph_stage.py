"""GraphStage: the decode forwards of chained pipeline stages through padded static buffers give the eager
stages' hidden states, logits and attention mass. On the CPU the padded path runs eagerly; with a CUDA device
the same test captures and replays the graphs (both stages on one GPU, the hand-over copied by hand)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT
from wicore.model.checkpoint import load_spec_file
from wicore.model.transformer import to_torch_dtype
from wicore.runtime.graph_stage import GraphStage
from wicore.runtime.stage import build_stage

TINY = load_spec_file(ROOT / "conf" / "model" / "tiny-gemma3.yaml")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_chained_graph_stages_decode_as_the_eager_stages(device):
    spec, pp, rows, slots = TINY, 2, 3, 4
    eager = [build_stage(spec, r, pp, device, slots, 64, seed=3) for r in range(pp)]
    graphed = [build_stage(spec, r, pp, device, slots + 1, 64, seed=3) for r in range(pp)]  # + the scratch slot
    graphs = [GraphStage(s.model, s.cache, first=s.rank == 0, hidden_size=spec.hidden_size,
                         dtype=to_torch_dtype(spec.dtype),
                         measure_attention=True) for s in graphed]
    dev = torch.device(device)
    ids = torch.randint(0, spec.vocab_size, (rows, 24), generator=torch.Generator().manual_seed(1)).to(dev)
    real = torch.tensor([2, 0, 3], device=dev)  # the rows' KV slots
    with torch.inference_mode():
        pos = torch.arange(0, 20, device=dev).expand(rows, 20)
        for group in (eager, graphed):  # the same prompt in both, eagerly
            x, m = ids[:, :20], None
            for s in group:
                x, m = s.model(x, pos, s.cache, real, m)
        for t in range(20, 24):  # decode steps: 3 rows through the bucket of 4 (one padding row)
            pos = torch.full((rows, 1), t, device=dev)
            x, m = ids[:, t:t + 1], None
            for s in eager:
                x, m = s.model(x, pos, s.cache, real, m, attention_mass=True)
            h: torch.Tensor | None = None
            hm: torch.Tensor | None = None
            for g in graphs:
                bk = g.stage(pos[:, 0], real, ids[:, t] if g.first else None)
                assert bk.size == 4
                if not g.first:
                    assert bk.hidden is not None and bk.mass_in is not None and h is not None and hm is not None
                    bk.hidden[:rows].copy_(h)
                    bk.mass_in[:rows].copy_(hm)
                y, gm = g.run(bk)
                h, hm = y[:rows].clone(), gm[:rows].clone() if gm is not None else None
            assert h is not None and hm is not None
            tol = dict(rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(h, x, **tol)  # last stage: the logits
            torch.testing.assert_close(hm, m, **tol)
    assert graphs[0].mode == ("graph" if device == "cuda" else "eager")
    assert graphs[0].captures == (1 if device == "cuda" else 0) and graphs[1].calls == 4
    for s in graphed:  # the padding row writes the scratch slot (the last): slot 1, which no row holds, stays empty
        assert s.cache.max_slots == slots + 1 and not s.cache.k[s.layers.start][1].any()
