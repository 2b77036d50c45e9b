"""Terminal renderings of stat, top and tap."""

import time

from rich.table import Table

from nodeagent.observe.aggregate import RouteTotals, StatRow, ends


def latency_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}ms" if value >= 10 else f"{value:.1f}ms"


def stat_table(rows: list[StatRow], window_s: float, meshed: dict[str, str]) -> Table:
    table = Table(title=f"Traffic to each destination, over {window_s:.1f}s", title_justify="left")
    for column in ("DESTINATION", "MESHED", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "TCP_CONN"):
        table.add_column(column, justify="left" if column == "DESTINATION" else "right", overflow="fold")
    for row in rows:
        table.add_row(row.destination, meshed.get(row.destination, "-"),
                      "-" if row.success_rate is None else f"{row.success_rate:.2%}", f"{row.rps:.1f}",
                      latency_text(row.p50), latency_text(row.p95), latency_text(row.p99),
                      f"{row.open_connections:.0f}")
    return table


def top_table(rows: list[tuple[tuple, RouteTotals]], limit: int = 20) -> Table:
    table = Table(title="Top routes (from tap)", title_justify="left")
    for column in ("SOURCE", "DESTINATION", "METHOD", "PATH", "COUNT", "BEST", "WORST", "LAST", "SUCCESS_RATE"):
        table.add_column(column)
    for (source, destination, method, path), t in rows[:limit]:
        table.add_row(source, destination, method, path, str(t.count), latency_text(t.best_ms),
                      latency_text(t.worst_ms), latency_text(t.last_ms), f"{t.successes / t.count:.2%}")
    return table


def tap_line(event: dict) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(event["ts"])) + f".{int(event['ts'] * 1000) % 1000:03d}"
    source, destination = ends(event)
    if event.get("kind") == "tls":
        return f"{stamp} {event['direction']} src={source} dst={destination} tls-passthrough sni={event['sni'] or '-'}"
    return (f"{stamp} {event['direction']} src={source} dst={destination} "
            f"tls={str(event['tls']).lower()} :method={event['method']} :authority={event['authority']} "
            f":path={event['path']} :status={event['status']} latency={event['latency_ms']:.3f}ms")


def short_identity(identity: str) -> str:
    """spiffe://td/ns/N/sa/S -> S.N (as linkerd viz edges shows identities)."""
    parts = identity.split("/")
    if identity.startswith("spiffe://") and len(parts) == 7:
        return f"{parts[6]}.{parts[4]}"
    return identity


def edges_table(edges: list) -> Table:
    table = Table(title="Edges (totals since the agents started)", title_justify="left")
    for column in ("SRC", "DST", "SRC_NS", "DST_NS", "SECURED", "CLIENT_ID", "SERVER_ID", "REQUESTS", "SUCCESS",
                   "CONNECTIONS", "BYTES", "SEEN_BY"):
        table.add_column(column, justify="right" if column in ("REQUESTS", "SUCCESS", "CONNECTIONS", "BYTES")
                         else "left", overflow="fold")
    for e in edges:
        answered = e.successes + e.failures
        table.add_row(e.src, e.dst, e.src_namespace or "-", e.dst_namespace or "-", "√" if e.tls else "-",
                      ",".join(short_identity(i) for i in e.client_id.split(",")) if e.client_id else "-",
                      ",".join(short_identity(i) for i in e.server_id.split(",")) if e.server_id else "-",
                      f"{e.requests:.0f}", f"{e.successes / answered:.2%}" if answered else "-",
                      f"{e.connections:.0f}", f"{e.bytes_read + e.bytes_written:.0f}",
                      e.seen_by + (" (verified)" if e.verified else ""))
    return table
