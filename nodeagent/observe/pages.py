"""The console's HTML, rendered server-side from two snapshots: pure.

Every page is a fixed frame and a live part (`<div id="live">`) that the browser fetches again
every few seconds (`?part=live`, static/console.js); a workload's page also streams its tap
(rows and the routes table arrive as HTML from /tap/...). Everything shown is escaped here.
"""

import time
import urllib.parse
from dataclasses import dataclass
from html import escape

from nodeagent.observe import graph
from nodeagent.observe.aggregate import RouteTotals, StatRow, ends, stat_rows
from nodeagent.observe.snapshot import Snapshot, namespace_of
from nodeagent.observe.views import latency_text, short_identity

REFRESH_S = 3
TAP_ROWS = 50  # rows the browser keeps (console.js)
MAX_PODS_SHOWN = 100


@dataclass(frozen=True)
class Window:
    """The latest snapshot and the one rates are computed against (None until there are two)."""
    before: Snapshot | None
    after: Snapshot

    @property
    def seconds(self) -> float:
        return self.after.at - self.before.at if self.before else 0.0

    def rows(self, pick) -> list[StatRow]:
        """Stat rows of `pick(snapshot)` (a dict of Totals) between the two snapshots."""
        return stat_rows(pick(self.before) if self.before else {}, pick(self.after), self.seconds)

    def edge_rates(self) -> dict:
        if not self.before or self.seconds <= 0:
            return {}
        before = {e.key(): e.requests for e in self.before.edges}
        return {e.key(): (e.requests - before.get(e.key(), 0.0)) / self.seconds for e in self.after.edges}


def workload_url(key: str) -> str:
    return "/workloads/" + urllib.parse.quote(key)


def namespace_url(namespace: str) -> str:
    return "/namespaces/" + urllib.parse.quote(namespace, safe="")


def _node_link(node: str) -> str | None:
    return workload_url(node) if node.count("/") >= 2 else None


def page(title: str, live_url: str, live: str, extra: str = "") -> str:
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
            f'<title>{escape(title)} · nodeagent</title>'
            '<link rel="stylesheet" href="/static/console.css"><script src="/static/console.js" defer></script>'
            '</head><body><header><a href="/" class="brand">nodeagent</a><nav><a href="/">Namespaces</a>'
            '<a href="/edges">Edges</a></nav></header>'
            f'<main><h1>{escape(title)}</h1><div id="live" data-refresh="{escape(live_url)}" '
            f'data-every="{REFRESH_S}">{live}</div>{extra}</main></body></html>')


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _table(headers: list[str], rows: list[list[str]], css: str = "", empty: str = "Nothing yet.") -> str:
    if not rows:
        return f'<p class="empty">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


GOLDEN = ["Success", "RPS", "P50", "P95", "P99", "TCP", "mTLS"]


def _golden(row: StatRow | None, window_s: float) -> list[str]:
    if row is None:
        return ["-"] * len(GOLDEN)
    return [_percent(row.success_rate), f"{row.rps:.1f}" if window_s > 0 else "-", latency_text(row.p50),
            latency_text(row.p95), latency_text(row.p99), f"{row.open_connections:.0f}", _percent(row.mtls)]


def _status(window: Window) -> str:
    snapshot = window.after
    stamp = time.strftime("%H:%M:%S")
    over = f"rates over the last {window.seconds:.0f}s" if window.before else "rates from the next poll on"
    problems = "".join(f'<li class="error">{escape(e)}</li>' for e in snapshot.errors)
    return (f'<p class="status">Updated {stamp}; {over}; {len(snapshot.pods)} meshed pods.</p>'
            + (f"<ul>{problems}</ul>" if problems else ""))


def overview_live(window: Window) -> str:
    snapshot = window.after
    rows = {r.destination: r for r in window.rows(Snapshot.namespaces)}
    table = []
    for namespace in sorted(rows):
        keys = [k for k in snapshot.sizes if namespace_of(k) == namespace]
        meshed = sum(snapshot.meshed(k) for k in keys)
        table.append([f'<a href="{namespace_url(namespace)}">{escape(namespace)}</a>',
                      f"{meshed}/{sum(snapshot.sizes[k] for k in keys)}", *_golden(rows[namespace], window.seconds)])
    arcs = graph.arcs_of(snapshot.edges, window.edge_rates())
    return (_status(window) + "<h2>Namespaces</h2>"
            + _table(["Namespace", "Meshed", *GOLDEN], table, "namespaces", "No namespaces in the agents' view.")
            + "<h2>Call graph</h2>" + graph.svg(arcs, _node_link))


def namespace_live(window: Window, namespace: str) -> str:
    snapshot = window.after
    rows = {r.destination: r for r in window.rows(lambda s: s.workloads)}
    table = []
    for key in sorted(k for k in snapshot.sizes if namespace_of(k) == namespace):
        table.append([f'<a href="{workload_url(key)}">{escape(key.partition("/")[2])}</a>',
                      f"{snapshot.meshed(key)}/{snapshot.sizes[key]}", *_golden(rows.get(key), window.seconds)])
    mine = [e for e in snapshot.edges if namespace in (e.src_namespace, e.dst_namespace)]
    return (_status(window) + "<h2>Workloads</h2>"
            + _table(["Workload", "Meshed", *GOLDEN], table, "workloads", "No workloads in this namespace.")
            + "<h2>Call graph</h2>" + graph.svg(graph.arcs_of(mine, window.edge_rates()), _node_link))


def _identities(value: str) -> str:
    return escape(",".join(short_identity(i) for i in value.split(","))) if value else "-"


def edges_table(edges: list, rates: dict, empty: str = "No edges seen yet.") -> str:
    rows = []
    for e in edges:
        answered = e.successes + e.failures
        src, dst = graph.node_name(e.src_namespace, e.src), graph.node_name(e.dst_namespace, e.dst)
        rows.append([_linked(src), _linked(dst), "yes" if e.tls else "no", _identities(e.client_id),
                     _identities(e.server_id), f"{e.requests:.0f}",
                     _percent(e.successes / answered if answered else None),
                     f"{rates[e.key()]:.1f}" if e.key() in rates else "-", f"{e.connections:.0f}",
                     f"{e.bytes_read + e.bytes_written:.0f}",
                     escape(e.seen_by + (" (verified)" if e.verified else ""))])
    return _table(["From", "To", "mTLS", "Client identity", "Server identity", "Requests", "Success", "RPS",
                   "Connections", "Bytes", "Seen by"], rows, "edges", empty)


def _linked(node: str) -> str:
    href = _node_link(node)
    return f'<a href="{href}">{escape(node)}</a>' if href else escape(node)


def edges_live(window: Window) -> str:
    return (_status(window) + "<p>Totals since the agents started; RPS over the last poll window.</p>"
            + edges_table(window.after.edges, window.edge_rates()))


def workload_live(window: Window, key: str) -> str:
    snapshot = window.after
    namespace, _, name = key.partition("/")
    rows = {r.destination: r for r in window.rows(lambda s: s.workloads)}
    source = ("its own pods' inbound requests" if key in snapshot.inbound_http
              else "its meshed clients' requests (its own pods' proxies counted no HTTP)")
    golden = _table(["Meshed", *GOLDEN], [[f"{snapshot.meshed(key)}/{snapshot.sizes.get(key, 0)}",
                                           *_golden(rows.get(key), window.seconds)]], "golden")
    pods = [[escape(p), escape(snapshot.pods[p].get("node") or "-"),
             escape(short_identity(snapshot.pods[p]["identity"]))] for p in snapshot.pods_of(key)[:MAX_PODS_SHOWN]]
    outbound = [[_linked(r.destination), *_golden(r, window.seconds)[:5]]
                for r in window.rows(lambda s: s.outbound.get(key, {}))]
    rates = window.edge_rates()
    node = graph.node_name(namespace, name)
    touching = [e for e in snapshot.edges if node in (graph.node_name(e.src_namespace, e.src),
                                                        graph.node_name(e.dst_namespace, e.dst))]
    return (_status(window) + f"<p>Traffic to it, from {source}.</p>" + golden
            + "<h2>Meshed pods</h2>" + _table(["Pod", "Node", "Identity"], pods, "pods", "No meshed pods.")
            + "<h2>Outbound</h2>" + _table(["Destination", "Success", "RPS", "P50", "P95", "P99"], outbound,
                                           "outbound", "Its pods called nothing yet.")
            + "<h2>Edges</h2>" + edges_table(touching, rates, "No edges to or from it yet.")
            + graph.svg(graph.arcs_of(touching, rates), _node_link))


def workload_extra(key: str) -> str:
    """The live tap of a workload's page: requests from or to it, streamed."""
    stream = "/tap/" + urllib.parse.quote(key)
    return ('<h2>Routes (live, from tap)</h2><p id="tap-problem" class="error"></p>'
            '<div id="routes"><p class="empty">Waiting for requests…</p></div>'
            f'<h2>Live tap</h2><table id="tap" data-stream="{escape(stream)}" data-rows="{TAP_ROWS}">'
            "<thead><tr><th>Time</th><th>Direction</th><th>From</th><th>To</th><th>Method</th><th>Path</th>"
            "<th>Status</th><th>Latency</th><th>mTLS</th></tr></thead><tbody></tbody></table>")


def tap_row(event: dict) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event["ts"])) + f".{int(event['ts'] * 1000) % 1000:03d}"
    source, destination = (escape(short_identity(end)) for end in ends(event))
    if event.get("kind") == "tls":
        cells = [stamp, escape(event["direction"]), source, destination, "TLS", "-",
                 escape("sni " + (event.get("sni") or "-")), "-", "passthrough"]
    else:
        status = int(event["status"])
        cells = [stamp, escape(event["direction"]), source, destination, escape(event["method"]),
                 escape(event["path"]), f'<span class="{"bad" if status >= 500 else "ok"}">{status}</span>',
                 latency_text(float(event["latency_ms"])), "yes" if event["tls"] else "no"]
    return "<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>"


def routes_table(rolled: list[tuple[tuple, RouteTotals]], limit: int = 20) -> str:
    rows = [[escape(short_identity(source)), escape(short_identity(destination)), escape(method), escape(path),
             str(t.count), _percent(t.successes / t.count), latency_text(t.best_ms), latency_text(t.worst_ms),
             latency_text(t.last_ms)]
            for (source, destination, method, path), t in rolled[:limit]]
    return _table(["From", "To", "Method", "Path", "Count", "Success", "Best", "Worst", "Last"], rows, "routes",
                  "Waiting for requests…")


def workload_title(key: str) -> str:
    namespace, _, name = key.partition("/")
    return f"{name} in {namespace}"

