"""The console's pure parts with plain values: what a poll reduces to, the call graph's layout
and drawing, and the HTML (escaped everywhere)."""

import html
import re

from nodeagent.observe import edges, graph, pages, snapshot
from nodeagent.observe.aggregate import roll_up, stat_rows, totals_by
from test_edges import TD, WEB, WEB_ID, inb, out, view

API_POD = "shop/api-6c-bbbbb"
DB_POD = "data/db-0"


def poll(at: float, samples: list, enrolled=(WEB, API_POD, DB_POD), errors=()) -> snapshot.Snapshot:
    v = view()
    document = edges.document("n0", samples, v, TD, [v.pods[p] for p in enrolled])
    return snapshot.reduce(at, [(samples, document)], list(errors))


def traffic(scale: float, inbound_http: bool = False) -> list:
    """web calls db (a pod, over mTLS) and api (a Service of two workloads, plaintext); db's
    and web's own pods count inbound TCP."""
    samples = [
        out("response_total", 8 * scale, WEB, "pod/data/db-0", True, classification="success"),
        out("response_total", 2 * scale, WEB, "pod/data/db-0", True, classification="failure"),
        out("response_latency_ms_bucket", 10 * scale, WEB, "pod/data/db-0", True, le="10.0"),
        out("response_latency_ms_bucket", 10 * scale, WEB, "pod/data/db-0", True, le="+Inf"),
        out("response_total", 5 * scale, WEB, "svc/shop/api", False, classification="success"),
        inb("tcp_open_total", 3 * scale, DB_POD, WEB_ID, True),
        inb("tcp_open_total", 1 * scale, DB_POD, "unauthenticated", False),
        inb("tcp_open_connections", 2, DB_POD, WEB_ID, True),
    ]
    if inbound_http:  # the server's own count: also its unmeshed clients' requests
        samples += [inb("response_total", 30 * scale, DB_POD, "unauthenticated", False, classification="success"),
                    inb("response_latency_ms_bucket", 30 * scale, DB_POD, "unauthenticated", False, le="+Inf")]
    return samples


def test_a_workloads_numbers_come_from_its_clients_without_inbound_http():
    before, after = poll(0, traffic(1)), poll(2, traffic(3))
    (db,) = [r for r in stat_rows(before.workloads, after.workloads, 2) if r.destination == "data/sts/db"]
    assert (db.success_rate, db.rps, db.p50, db.open_connections, db.mtls) == (0.8, 10.0, 5.0, 2, 0.75)
    assert "data/sts/db" not in after.inbound_http
    # A Service of two workloads is no one workload's: only on the client's outbound page.
    assert not any(k.endswith("api") for k in after.workloads)
    assert set(after.outbound["shop/deploy/web"]) == {"data/sts/db", "svc/shop/api"}
    assert after.peers == {"pod/data/db-0": "data/sts/db"}


def test_a_workloads_own_inbound_http_is_preferred():
    after = poll(2, traffic(3, inbound_http=True))
    db = after.workloads["data/sts/db"]
    assert (db.requests, db.successes, db.connections, db.secured) == (90, 90, 12, 9)
    assert after.inbound_http == {"data/sts/db"}


def test_sizes_meshed_pods_and_namespaces():
    after = poll(2, traffic(3), enrolled=(WEB, DB_POD))
    assert after.sizes["shop/deploy/api"] == 2 and after.meshed("shop/deploy/api") == 0
    assert after.meshed("data/sts/db") == 1 and after.pods_of("data/sts/db") == [DB_POD]
    namespaces = after.namespaces()
    assert set(namespaces) == {"shop", "data"} and namespaces["data"].requests == 30
    assert namespaces["shop"].requests == 0  # api's traffic is no one workload's


def test_mtls_share_is_of_the_window_else_of_all_time():
    before = totals_by([inb("tcp_open_total", 4, DB_POD, WEB_ID, True)], lambda labels: "db")
    after = totals_by([inb("tcp_open_total", 4, DB_POD, WEB_ID, True),
                       inb("tcp_open_total", 4, DB_POD, "unauthenticated", False)], lambda labels: "db")
    assert stat_rows(before, after, 1)[0].mtls == 0.0  # the window's new connections were all plaintext
    assert stat_rows(after, after, 1)[0].mtls == 0.5  # none new: since the start
    assert stat_rows({}, totals_by([], lambda labels: "db"), 1) == []


def arc(src, dst, secured=True, weight=1.0):
    return graph.Arc(src, dst, secured, "1 req", weight)


def test_ranks_put_callers_left_and_survive_cycles():
    arcs = [arc("a", "b"), arc("b", "c"), arc("a", "c"), arc("c", "a"), arc("d", "d"), arc("x", "b")]
    ranks = graph._ranks(["a", "b", "c", "d", "x"], arcs)
    assert ranks == {"a": 0, "b": 1, "c": 2, "d": 0, "x": 0}


def test_the_svg_draws_every_node_and_arc_escaped_and_links_workloads():
    arcs = [arc("shop/deploy/web", "data/sts/db"), arc("unmeshed", "shop/deploy/web", secured=False),
            arc("shop/deploy/web", "shop/deploy/web"), arc("shop/deploy/web", "x/<script>", weight=0)]
    drawn = graph.svg(arcs, pages._node_link)
    assert drawn.count('class="arc secured"') == 3 and drawn.count('class="arc plain"') == 1
    assert '<a href="/workloads/shop/deploy/web"' in drawn and "<script>" not in drawn
    assert "unmeshed" in drawn and 'href="/workloads/unmeshed"' not in drawn
    assert graph.svg([], pages._node_link) == '<p class="empty">No traffic seen yet.</p>'


def test_the_svg_draws_at_most_max_nodes_busiest_first():
    arcs = [arc("hub", f"n/s/{i:03}", weight=i) for i in range(100)]
    drawn = graph.svg(arcs, lambda node: None)
    assert drawn.count("<rect") == graph.MAX_NODES
    assert "n/s/099" in drawn and "n/s/000" not in drawn
    assert f"{101 - graph.MAX_NODES} more workloads not drawn" in drawn


def cells(text: str, css: str) -> list[list[str]]:
    table = re.search(f'<table class="{css}">.*?</table>', text).group(0)
    return [[html.unescape(re.sub("<[^>]+>", "", c)) for c in re.findall("<td>(.*?)</td>", row)]
            for row in re.findall("<tr>(.*?)</tr>", table.split("<tbody>")[1])]


def test_pages_show_rates_once_there_are_two_polls():
    first = pages.Window(None, poll(0, traffic(1)))
    assert cells(pages.overview_live(first), "namespaces")[0][:4] == ["data", "1/1", "80.0%", "-"]
    window = pages.Window(poll(0, traffic(1)), poll(2, traffic(3), errors=["agent 127.0.0.1:1 did not answer: x"]))
    overview = pages.overview_live(window)
    assert cells(overview, "namespaces") == [["data", "1/1", "80.0%", "10.0", "5.0ms", "9.5ms", "9.9ms", "2", "75.0%"],
                                             ["shop", "2/5", "-", "0.0", "-", "-", "-", "0", "-"]]
    assert "agent 127.0.0.1:1 did not answer" in overview and "rates over the last 2s" in overview
    workloads = cells(pages.namespace_live(window, "shop"), "workloads")
    assert [w[:2] for w in workloads] == [["app/api", "0/1"], ["deploy/api", "1/2"], ["deploy/web", "1/1"],
                                          ["pod/curl", "0/1"]]
    web = pages.workload_live(window, "shop/deploy/web")
    assert cells(web, "outbound") == [["data/sts/db", "80.0%", "10.0", "5.0ms", "9.5ms", "9.9ms"],
                                      ["svc/shop/api", "100.0%", "5.0", "-", "-", "-"]]
    assert cells(web, "pods") == [[WEB, "n0", "web.shop"]]
    (edge,) = [e for e in cells(web, "edges") if e[:2] == ["shop/deploy/web", "data/sts/db"]]
    assert edge[:3] == ["shop/deploy/web", "data/sts/db", "yes"] and edge[3:5] == ["web.shop", "db.data"]


def test_pages_are_whole_documents_with_a_live_part():
    document = pages.page("a <b>", "/x?part=live", "<p>live</p>", pages.workload_extra("shop/deploy/web"))
    assert document.startswith("<!doctype html>") and "a &lt;b&gt;" in document
    assert 'data-refresh="/x?part=live"' in document and 'data-stream="/tap/shop/deploy/web"' in document


EVENT = {"ts": 1.5, "direction": "outbound", "namespace": "shop", "pod": "web-<i>", "destination": "svc/shop/api",
         "authority": "api", "method": "GET", "path": "/<script>alert(1)</script>", "status": 503,
         "latency_ms": 12.25, "tls": True}


def test_tap_rows_and_routes_are_escaped():
    row = pages.tap_row(EVENT)
    assert "<script>" not in row and "&lt;script&gt;" in row and "web-&lt;i&gt;" in row
    assert '<span class="bad">503</span>' in row and "\n" not in row
    tls = pages.tap_row({**EVENT, "kind": "tls", "sni": "db.<x>", "method": "", "path": ""})
    assert "sni db.&lt;x&gt;" in tls and "passthrough" in tls
    routes = pages.routes_table(roll_up([EVENT, {**EVENT, "status": 200}]))
    assert cells(routes, "routes") == [["shop/web-<i>", "svc/shop/api", "GET", "/<script>alert(1)</script>", "2",
                                        "50.0%", "12ms", "12ms", "12ms"]]
    assert "<script>" not in routes


def test_an_inbound_event_is_from_the_client_to_the_pod_that_saw_it():
    inbound = {**EVENT, "direction": "inbound", "pod": "api-1", "destination": WEB_ID, "path": "/x"}
    row = cells(f'<table class="t"><tbody>{pages.tap_row(inbound)}</tbody></table>', "t")[0]
    assert row[1:4] == ["inbound", "web.shop", "shop/api-1"]
    assert [key for key, _ in roll_up([inbound])] == [(WEB_ID, "shop/api-1", "GET", "/x")]
