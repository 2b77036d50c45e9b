"""The one-process HTTP/1 benchmark (benchmarks/proxy_cost.py) runs end to end in every mode
(no speed is judged). Needs root (it makes two network namespaces), not the lab."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.proxy_cost import MODES


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_the_one_process_http1_benchmark_runs_in_every_mode():
    done = subprocess.run([sys.executable, "-m", "benchmarks.proxy_cost", "--requests", "300", "--runs", "1",
                           "--json"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert sorted(result) == sorted(f"this checkout {mode}" for mode in MODES)
    for measured in result.values():
        assert measured["cpu_us_per_request"]["median"] > 0 and measured["req_per_s"]["median"] > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_a_new_connection_per_request_is_measured_too():
    done = subprocess.run([sys.executable, "-m", "benchmarks.proxy_cost", "--modes", "mesh", "--new-connections", "1",
                           "--runs", "1", "--json"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    measured = json.loads(done.stdout)["this checkout mesh"]
    assert measured["requests_per_run"]["median"] > 0 and measured["cpu_us_per_request"]["median"] > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
def test_http2_is_measured_on_the_mesh_and_the_one_hop():
    done = subprocess.run([sys.executable, "-m", "benchmarks.proxy_cost", "--protocol", "h2", "--modes", "mesh,one-hop",
                           "--requests", "300", "--runs", "1", "--json"], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert sorted(result) == ["this checkout mesh", "this checkout one-hop"]
    for measured in result.values():
        assert measured["cpu_us_per_request"]["median"] > 0 and measured["req_per_s"]["median"] > 0
