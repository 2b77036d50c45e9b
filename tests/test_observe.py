import math

import pytest

from nodeagent.observe.aggregate import histogram_quantile, roll_up, stat_rows, totals_by_destination
from nodeagent.observe.views import tap_line

INF = math.inf


@pytest.mark.parametrize("q,buckets,expected", [
    (0.5, [(1, 0), (2, 10), (INF, 10)], 1.5),  # all in (1, 2]: the middle
    (0.99, [(1, 0), (2, 10), (INF, 10)], 1.99),
    (0.5, [(10, 5), (20, 10), (INF, 10)], 10.0),
    (0.9, [(10, 5), (20, 5), (INF, 10)], 20.0),  # beyond the last finite bucket
    (0.5, [(10, 0), (INF, 0)], None),
    (0.5, [], None),
])
def test_histogram_quantile(q, buckets, expected):
    result = histogram_quantile(q, buckets)
    assert result == (pytest.approx(expected) if expected is not None else None)


def sample(name, value, **labels):
    return name, {"direction": "outbound", **labels}, value


def test_stat_rows_are_deltas_between_scrapes_summed_over_pods_and_tls():
    def scrape(ok, failed, fast):
        return totals_by_destination([
            sample("response_total", ok, peer="svc/a", classification="success", tls="true", pod="p1"),
            sample("response_total", failed, peer="svc/a", classification="failure", tls="false", pod="p2"),
            sample("response_latency_ms_bucket", fast, peer="svc/a", le="5.0", pod="p1"),
            sample("response_latency_ms_bucket", ok + failed, peer="svc/a", le="10.0", pod="p1"),
            sample("response_latency_ms_bucket", ok + failed, peer="svc/a", le="+Inf", pod="p1"),
            sample("tcp_open_connections", 2, peer="svc/a", pod="p1"),
            ("response_total", {"direction": "inbound", "peer": "x"}, 99.0),
        ])

    before, after = scrape(10, 0, 10), scrape(28, 2, 20)
    (row,) = stat_rows(before, after, seconds=2.0)
    assert row.destination == "svc/a"
    assert row.success_rate == pytest.approx(0.9) and row.rps == pytest.approx(10.0)
    assert row.p50 == pytest.approx(5.0) and row.p99 == pytest.approx(9.9)
    assert row.open_connections == 2


def test_a_destination_without_requests_in_the_window_has_no_rates():
    totals = totals_by_destination([sample("response_total", 5, peer="svc/b", classification="success")])
    (row,) = stat_rows(totals, totals, seconds=1.0)
    assert row.success_rate is None and row.rps == 0 and row.p50 is None


def test_roll_up_groups_routes_busiest_first():
    def event(path, status, ms):
        return {"namespace": "default", "pod": "c", "destination": "svc/default/http", "method": "GET",
                "path": path, "status": status, "latency_ms": ms}

    tls = {"kind": "tls", "namespace": "default", "pod": "c", "destination": "external", "sni": "db", "method": "",
           "path": ""}
    rows = roll_up([event("/a", 200, 3), tls, event("/b", 200, 1), event("/a", 503, 9), event("/a", 200, 2)])
    (route_a, a), (route_b, b) = rows
    assert route_a[3] == "/a" and (a.count, a.successes, a.best_ms, a.worst_ms, a.last_ms) == (3, 2, 2, 9, 2)
    assert route_b[3] == "/b" and b.count == 1


def test_a_tls_tap_event_shows_its_server_name():
    line = tap_line({"ts": 0.0, "kind": "tls", "direction": "outbound", "namespace": "default", "pod": "c",
                     "destination": "external", "sni": "db.example", "method": "", "path": ""})
    assert line.endswith("outbound src=default/c dst=external tls-passthrough sni=db.example")
