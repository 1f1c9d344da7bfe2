"""The OpenAI engine's routing (models/openai_engine.py Router): least outstanding requests, prompt
affinity, per-endpoint limits, failover and endpoints coming back. Real servers: test_served_engine.py."""
from __future__ import annotations

import threading
import time

import pytest

from evoforge.models.openai_engine import Endpoint, EndpointsUnavailable, Router, served_name_for

pytestmark = pytest.mark.unit


def _router(count=2, limit=4, healthy=lambda e: True, timeout=60.0) -> Router:
    return Router([Endpoint(f"http://h{i}/v1", served_name="m") for i in range(count)], limit, healthy, timeout)


def test_requests_go_to_the_endpoint_with_the_fewest_outstanding():
    router = _router()
    a, b, c = (router.acquire(key) for key in ("p1", "p2", "p3"))
    assert a is not b and {a.url, b.url} == {"http://h0/v1", "http://h1/v1"}
    router.release(a)
    router.release(a if c is a else b)  # now one endpoint has none outstanding
    idle = min(router.endpoints, key=lambda e: e.outstanding)
    assert router.acquire("p4") is idle


def test_a_prompt_goes_back_to_its_endpoint_while_that_one_has_room():
    router = _router(limit=2)
    first = router.acquire("tree")
    router.release(first)
    assert router.acquire("other") is first  # a tie goes to the first endpoint: `first` has 1, the other 0
    assert router.acquire("tree") is first  # less loaded elsewhere, but the prompt's prefix is cached on `first`
    assert router.acquire("tree") is not first  # `first` is full (limit 2): least outstanding wins


def test_the_concurrency_limit_holds_a_request_until_one_finishes():
    router = _router(count=1, limit=1)
    held = router.acquire("a")
    got = []
    waiter = threading.Thread(target=lambda: got.append(router.acquire("b")))
    waiter.start()
    time.sleep(0.3)
    assert not got  # still waiting
    router.release(held)
    waiter.join(5)
    assert got == [held]


def test_a_failed_endpoint_is_skipped_then_probed_and_used_again():
    alive = {"http://h0/v1": False, "http://h1/v1": True}
    router = _router(healthy=lambda e: alive[e.url])
    dead = next(e for e in router.endpoints if e.url == "http://h0/v1")
    router.release(_take(router, dead), failed=True)
    assert not dead.up
    assert all(router.acquire(f"k{i}").url == "http://h1/v1" for i in range(3))
    alive["http://h0/v1"] = True
    dead.down_until = time.monotonic() - 1  # its back-off is over
    assert router.acquire("next") is dead and dead.up


def test_all_endpoints_down_past_the_timeout_fails_in_one_line():
    router = _router(healthy=lambda e: False, timeout=0.5)
    for endpoint in router.endpoints:
        endpoint.down_until = time.monotonic() + 0.1
    with pytest.raises(EndpointsUnavailable, match="no endpoint has answered for 0 s: http://h0/v1, http://h1/v1"):
        router.acquire("x")


def test_the_served_name_is_found_by_id_or_by_folder():
    from evoforge.models.registry import ResolvedModel

    model = ResolvedModel("/nonexistent/ckpt", "ckpt@abc")
    assert served_name_for([{"id": "ckpt@abc"}], model, "/nonexistent/ckpt") == "ckpt@abc"
    assert served_name_for([{"id": "/nonexistent/ckpt"}], model, "/nonexistent/ckpt") == "/nonexistent/ckpt"
    assert served_name_for([{"id": "other@1", "root": "/elsewhere"}], model, "/nonexistent/ckpt") is None


def _take(router: Router, endpoint: Endpoint) -> Endpoint:
    with router.cond:
        endpoint.outstanding += 1
    return endpoint


def test_ray_workers_get_the_prefect_server_and_the_projects_caches(monkeypatch):
    """Without PREFECT_API_URL each Ray worker running Prefect code would start its own temporary server
    on the project's SQLite file; with it they all report to the driver's server (models/ray_cluster.py)."""
    from evoforge.data import home
    from evoforge.models import ray_cluster

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    env = ray_cluster.runtime_env()["env_vars"]
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert env["EVOFORGE_HOME"] == str(home.home()) and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_CACHE_ROOT"].startswith(str(home.home()))
    monkeypatch.delenv("PREFECT_API_URL")
    assert "PREFECT_API_URL" not in ray_cluster.runtime_env()["env_vars"]
