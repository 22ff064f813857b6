"""Fuzz every endpoint of the server's OpenAPI schema (schemathesis): no input gives a 5xx.

The server is the digital twin of the tiny model (context 512, sub-millisecond steps) so that
the valid requests the fuzzer generates also finish quickly; a 2 s request timeout bounds
the rest. Bounded to a few dozen examples per operation (well under 60 s on 2 cores).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from tests.test_server import launch  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_url(tmp_path_factory) -> Iterator[str]:
    d = tmp_path_factory.mktemp("fuzz")
    with launch("--backend", "sim", "hardware=h100", "model=tiny-gemma3", "--request-timeout", "2",
                "--max-body-bytes", "65536", log=d / "server.log") as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(fuzz_url):
    return schemathesis.openapi.from_url(fuzz_url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, fuzz_url):
    case.call_and_validate(base_url=fuzz_url, checks=[not_a_server_error], timeout=10)


def test_server_still_healthy_and_idle_after_fuzzing(fuzz_url):
    from tests.test_server import wait_idle

    assert httpx.get(fuzz_url + "/health").status_code == 200
    wait_idle(fuzz_url, timeout=15)
    metrics = httpx.get(fuzz_url + "/metrics").text
    print(*(m for m in metrics.splitlines() if m.startswith(("wicore_requests_total", "wicore_http_errors"))))
    assert 'wicore_http_errors_total{code="400"}' in metrics  # the fuzzer sent invalid requests
    assert "wicore_requests_total{" in metrics  # ... and valid ones that ran
