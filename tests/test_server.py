"""The OpenAI-compatible server, driven as a real process on loopback with the official client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parent.parent
# the digital-twin timing config: ~31 ms per step (T4, Gemma-3-4B), long enough that the HTTP path
# (well under 1 ms per token on loopback) is small against it, short enough for a quick test
TWIN = ["hardware=t4", "model=gemma3-4b", "scheduler.max_num_seqs=4"]
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def launch(*args: str, log: Path) -> Iterator[str]:
    """Start ``wicore serve ARGS`` on a free loopback port; yields its base URL (no /v1)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "wicore.cli", "serve", "--port", str(port), *args],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not come up: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    """/status once nothing runs or waits; KV pages (and torch KV slots) must be back to zero."""
    deadline = time.monotonic() + timeout
    while True:
        st = httpx.get(url + "/status").json()
        slots = st["backend"].get("kv_slots_used", 0)
        if st["running"] == st["waiting"] == st["outstanding"] == st["kv_pages_used"] == slots == 0:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle: {st}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def torch_server(tmp_path_factory) -> Iterator[str]:
    from wicore.model.checkpoint import load_spec_file, write_random_checkpoint

    d = tmp_path_factory.mktemp("srv")
    ckpt = write_random_checkpoint(load_spec_file(ROOT / "conf/model/tiny-gemma3.yaml"), d / "tiny", dtype="fp32")
    with launch("--checkpoint", str(ckpt), "model=tiny-gemma3", "scheduler.max_num_seqs=8", "--threads", "1",
                log=d / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def twin_server(tmp_path_factory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("twin")
    with launch("--backend", "sim", *TWIN, "--max-queue", "2", "--api-key", KEY, log=d / "server.log") as url:
        yield url


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


# ----- the real runtime, through the official client ------------------------------------------
def test_models_list(torch_server):
    models = client(torch_server).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_non_streaming_and_streaming_agree(torch_server):
    c = client(torch_server)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello, who are you?"}]
    full = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0)
    assert full.object == "chat.completion"
    choice = full.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.role == "assistant"
    u = full.usage
    assert u.completion_tokens >= 1 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert choice.finish_reason == "stop" or u.completion_tokens == 24

    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == choice.message.content  # greedy: the same tokens, the chunks concatenate to the text
    assert finish == [choice.finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.model_dump() == u.model_dump()


def test_completions_with_token_ids_and_usage(torch_server):
    c = client(torch_server)
    out = c.completions.create(model="tiny", prompt=list(range(10, 40)), max_tokens=12, temperature=0.7,
                               extra_body={"ignore_eos": True, "top_k": 50})
    assert out.usage.prompt_tokens == 30 and out.usage.completion_tokens == 12
    assert out.choices[0].finish_reason == "length"
    stream = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, stream=True,
                                  extra_body={"ignore_eos": True})
    assert sum(1 for _ in stream) >= 2
    wait_idle(torch_server)


def test_client_disconnect_cancels_and_frees_kv(torch_server):
    with httpx.stream("POST", torch_server + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 400,
            "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(g.startswith("data: ") for g in got)
        st = httpx.get(torch_server + "/status").json()
        assert st["running"] == 1 and st["kv_pages_used"] > 0
    st = wait_idle(torch_server)
    assert st["steps"] < 380  # it was stopped, not run to the end
    metrics = httpx.get(torch_server + "/metrics").text
    assert 'wicore_requests_total{outcome="cancelled"}' in metrics


# ----- bad input: OpenAI-style 4xx, never a 5xx, the server keeps serving ------------------------
BAD = [
    ("chat", b"{not json", 400, "invalid_json"),
    ("chat", b"[1, 2]", 400, None),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, 400, None),  # no model
    ("chat", {"model": "tiny", "messages": []}, 400, None),
    ("chat", {"model": "tiny", "messages": "hi"}, 400, None),
    ("chat", {"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ("chat", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, None),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, None),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6},
     400, "context_length_exceeded"),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 600}]}, 400,
     "context_length_exceeded"),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, 400, None),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, None),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": "a"}, 400, None),
    ("chat", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, None),
    ("completions", {"model": "tiny", "prompt": [1, 2, 99999]}, 400, None),
    ("completions", {"model": "tiny", "prompt": []}, 400, None),
    ("completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, None),
    ("completions", {"model": "tiny", "prompt": {"x": 1}}, 400, None),
]


@pytest.mark.parametrize("endpoint,body,status,code", BAD)
def test_bad_input_gives_openai_error(torch_server, endpoint, body, status, code):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{torch_server}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code


def test_oversized_body_and_unknown_route(torch_server):
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    r = httpx.post(torch_server + "/v1/chat/completions", content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(torch_server + "/v1/completions", content=chunked())  # no Content-Length
    assert r.status_code == 413
    assert httpx.get(torch_server + "/v1/nope").status_code == 404
    assert httpx.get(torch_server + "/health").json()["ready"] is True
    assert httpx.get(torch_server + "/metrics").text.count('wicore_http_errors_total{code="413"}') == 1


# ----- the digital twin: timing follows the simulator -------------------------------------------
def predicted(concurrency: int, n: int, prompt: int, output: int) -> dict[str, float]:
    from experiments.build import build_sim
    from tests.conftest import make_cfg

    cfg = make_cfg(*TWIN, "workload=chat", f"workload.concurrency={concurrency}", f"workload.num_requests={n}",
                   "workload.prompt.kind=fixed", f"workload.prompt.value={prompt}", "workload.output.kind=fixed",
                   f"workload.output.value={output}")
    s = build_sim(cfg)
    end = s.driver.run()
    req, _, _ = s.recorder.frames()
    return {"ttft": float(req.ttft.mean()), "tpot": float(req.tpot.mean()), "end": end}


async def _streams(url: str, users: int, per_user: int, prompt: int, output: int) -> tuple[list, list, float]:
    c = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    ttfts: list[float] = []
    tpots: list[float] = []

    async def user() -> None:
        for _ in range(per_user):
            t0 = time.perf_counter()
            times = []
            async for ch in await c.completions.create(model="gemma3-4b", prompt=list(range(100, 100 + prompt)),
                                                       max_tokens=output, stream=True,
                                                       extra_body={"ignore_eos": True}):
                if ch.choices and ch.choices[0].text:
                    times.append(time.perf_counter())
            assert len(times) == output
            ttfts.append(times[0] - t0)
            tpots.append((times[-1] - times[0]) / (output - 1))

    t0 = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(users)))
    return ttfts, tpots, time.perf_counter() - t0


def test_twin_timing_matches_the_simulator(twin_server):
    """The twin sleeps each step to its simulated end, so it cannot be faster than the prediction;
    what it adds is per-step bookkeeping (engine + SimPy, ~0.1-0.3 ms) and the HTTP path (request
    parsing, SSE over loopback, the client's parsing: ~1-3 ms per request on this 2-core box, shared
    with pytest). Tolerance: measured within [-3%, +10% + 3 ms] per token and +10% + 25 ms for TTFT."""
    asyncio.run(_streams(twin_server, 1, 1, 64, 16))  # untimed: the server's and the client's first request (cold)
    # one user, sequential requests: TTFT = one prefill step, gaps = single-sequence decode steps
    ttft, tpot, _ = asyncio.run(_streams(twin_server, 1, 3, 64, 16))
    p = predicted(1, 3, 64, 16)
    print(f"twin 1 user: ttft {np.mean(ttft) * 1e3:.1f} ms (sim {p['ttft'] * 1e3:.1f}), "
          f"tpot {np.mean(tpot) * 1e3:.2f} ms (sim {p['tpot'] * 1e3:.2f})")
    assert p["tpot"] * 0.97 <= np.mean(tpot) <= p["tpot"] * 1.10 + 0.003, (tpot, p)
    assert p["ttft"] * 0.97 <= np.mean(ttft) <= p["ttft"] * 1.10 + 0.025, (ttft, p)
    # four concurrent users (the running batch): decode gaps and the makespan of the closed loop
    ttft, tpot, wall = asyncio.run(_streams(twin_server, 4, 2, 64, 16))
    p = predicted(4, 8, 64, 16)
    print(f"twin 4 users: tpot {np.mean(tpot) * 1e3:.2f} ms (sim {p['tpot'] * 1e3:.2f}), "
          f"makespan {wall:.3f} s (sim {p['end']:.3f})")
    assert p["tpot"] * 0.97 <= np.mean(tpot) <= p["tpot"] * 1.10 + 0.003, (tpot, p)
    assert p["end"] * 0.97 <= wall <= p["end"] * 1.10 + 0.1, (wall, p)
    st = wait_idle(twin_server)
    assert st["backend"]["name"] == "sim" and st["policy"]["queue"] == "fcfs"


def test_twin_api_key_queue_limit_and_timeout(twin_server):
    body = {"model": "gemma3-4b", "prompt": "hello", "max_tokens": 20, "ignore_eos": True}
    assert httpx.post(twin_server + "/v1/completions", json=body).status_code == 401
    assert httpx.post(twin_server + "/v1/completions", json=body,
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    h = {"Authorization": f"Bearer {KEY}"}

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30, headers=h) as ac:
            rs = await asyncio.gather(*(ac.post(twin_server + "/v1/completions", json=body) for _ in range(9)))
        return [r.status_code for r in rs]

    codes = asyncio.run(burst())  # 4 run + 2 queue; the rest are refused
    assert codes.count(200) >= 6 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    r = httpx.post(twin_server + "/v1/completions", headers=h, json={**body, "max_tokens": 400, "timeout": 0.2})
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    wait_idle(twin_server)


# ----- pieces without a server -----------------------------------------------------------------
def test_chat_templates():
    from wicore.server.chat_template import render

    msgs = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye")]
    assert render(msgs, "gemma3") == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
                                      "Hello<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n"
                                      "<start_of_turn>model\n")
    assert render(msgs[1:2], "llama") == ("<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                                          "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_byte_tokenizer_matches_its_tokenizer_json_and_streams(tmp_path):
    from wicore.server.tokenizer import ByteTokenizer, HFTokenizer, StreamDecoder, write_byte_tokenizer_json

    b = ByteTokenizer(512)
    h = HFTokenizer(write_byte_tokenizer_json(tmp_path), 2, (1,))
    for s in ["hello world", "héllo 日本語\n\t<start_of_turn>", ""]:
        assert b.encode(s) == h.encode(s) and b.decode(b.encode(s)) == h.decode(h.encode(s)) == s
    for tok in (b, h):
        dec = StreamDecoder(tok)
        ids = tok.encode("日本語 ok ü")
        assert "".join(dec.push([i]) for i in ids) + dec.push([], final=True) == "日本語 ok ü"
