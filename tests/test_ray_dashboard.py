"""Ray's dashboard: a head the driver starts serves it on loopback (a real HTTP request), the
campaign store records its URL, and ``status`` shows it."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest
import ray

import configs
from orchestrator import scheduler
from slurm.raynode import NodePorts, head_start_command


def test_a_started_cluster_serves_the_dashboard_on_loopback():
    if ray.is_initialized():
        pytest.skip("Ray already runs in this process")
    taken = socket.socket()  # another Ray (or anything) holds the configured port: a free one is used
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ray_cfg = configs.load(overrides=[f"ray.dashboard_port={taken.getsockname()[1]}"]).ray
    assert ray_cfg.dashboard and ray_cfg.dashboard_host == "127.0.0.1"
    assert scheduler.connect(num_cpus=1, ray_cfg=ray_cfg)
    try:
        url = scheduler.dashboard_url()
        assert url is not None and url.startswith("http://127.0.0.1:")
        assert not url.endswith(f":{taken.getsockname()[1]}")
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

        headers = get_auth_headers_if_auth_enabled({})  # the cluster's token (Ray turns token auth on)
        deadline, body = time.monotonic() + 60, None
        while body is None:  # the dashboard's HTTP server comes up shortly after ray.init returns
            try:
                request = urllib.request.Request(f"{url}/api/version", headers=headers)
                with urllib.request.urlopen(request, timeout=5) as response:
                    body = response.read().decode()
            except urllib.error.HTTPError:
                raise
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert "ray_version" in body
        if headers:  # without the token the dashboard refuses
            with pytest.raises(urllib.error.HTTPError, match="401"):
                urllib.request.urlopen(f"{url}/api/version", timeout=5)
    finally:
        ray.shutdown()
        taken.close()


def test_the_slurm_head_starts_the_dashboard_as_configured():
    ports = NodePorts(*range(1, 7), min_worker=10, max_worker=20)
    on = head_start_command(6379, "/tmp/x", ports, dashboard=("127.0.0.1", 8265))
    assert "--include-dashboard=true" in on and "--dashboard-host=127.0.0.1" in on and "--dashboard-port=8265" in on
    assert "--include-dashboard=false" in head_start_command(6379, "/tmp/x", ports, dashboard=None)


def test_status_links_the_ray_dashboard(tmp_path):
    from rich.console import Console

    from orchestrator.status import read_status, render
    from orchestrator.store import CampaignStore

    with CampaignStore(tmp_path / "campaign.db") as store:
        store.set_meta("ray_dashboard_url", "http://127.0.0.1:8265")
    status = read_status(tmp_path)
    assert status.ray_dashboard == "http://127.0.0.1:8265"
    console = Console(width=200, record=True)
    console.print(render(status))
    assert "Ray dashboard: http://127.0.0.1:8265" in console.export_text()


def test_a_stopped_driver_s_ray_dashboard_is_not_linked(tmp_path):
    import os
    import socket

    from rich.console import Console

    from dashboards.data import read_store
    from orchestrator.status import read_status, render
    from orchestrator.store import CampaignStore

    with CampaignStore(tmp_path / "campaign.db") as store:
        store.set_meta("ray_dashboard_url", "http://127.0.0.1:8265")
        store.log_event("driver_start", f"pid={os.getpid()} host={socket.gethostname()}")  # this process: running
    assert read_store(tmp_path)[2]["ray_dashboard_url"] == "http://127.0.0.1:8265"
    with CampaignStore(tmp_path / "campaign.db") as store:
        store.log_event("driver_stop", "attempts=1 interrupted=False")
    console = Console(width=200, record=True)
    console.print(render(read_status(tmp_path)))
    assert "Ray dashboard" not in console.export_text()  # its cluster ended with the driver
    assert "ray_dashboard_url" not in read_store(tmp_path)[2]  # the campaign dashboard links it no more
