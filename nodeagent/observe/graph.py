"""The call graph (edges between workloads) drawn as an SVG, server-side: pure.

Layout: workloads in columns by their longest chain of callers (clients left, servers right;
back edges of a cycle are drawn but do not move anyone), stacked in each column in name order.
At most MAX_NODES workloads are drawn (the busiest edges first); the rest are counted in a note.
"""

from dataclasses import dataclass
from html import escape

MAX_NODES = 60
BOX_W, BOX_H, COLUMN_W, ROW_H, MARGIN = 200, 40, 300, 64, 20


@dataclass(frozen=True)
class Arc:
    src: str  # a node name: "default/app/client", "unmeshed", "external"
    dst: str
    secured: bool
    label: str  # "12.5 rps", "3 conn"
    weight: float  # what orders arcs when not all fit


def node_name(namespace: str, name: str) -> str:
    return f"{namespace}/{name}" if namespace else name


def arcs_of(edges: list, rates: dict) -> list[Arc]:
    """Arcs from merged edges; `rates`: an edge's key -> requests per second, where known."""
    arcs = []
    for e in edges:
        rps = rates.get(e.key())
        if rps:
            label = f"{rps:.1f} rps"
        elif e.requests:
            label = f"{e.requests:.0f} req"
        else:
            label = f"{e.connections:.0f} conn"
        arcs.append(Arc(node_name(e.src_namespace, e.src), node_name(e.dst_namespace, e.dst), e.tls, label,
                        (rps or 0) * 1e9 + e.requests + e.connections))
    return arcs


def _ranks(nodes: list[str], arcs: list[Arc]) -> dict[str, int]:
    """Longest path from a source, ignoring the back edges a depth-first walk finds."""
    out = {n: sorted({a.dst for a in arcs if a.src == n and a.dst != n}) for n in nodes}
    order, state = [], {}  # state: 1 on the walk's stack, 2 done

    def walk(start: str) -> None:
        stack = [(start, iter(out[start]))]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                order.append(node)
                stack.pop()
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(out[child])))

    for node in nodes:
        if node not in state:
            walk(node)
    position = {n: i for i, n in enumerate(reversed(order))}  # a topological order of the forward edges
    rank = dict.fromkeys(nodes, 0)
    for node in reversed(order):
        for child in out[node]:
            if position[child] > position[node]:
                rank[child] = max(rank[child], rank[node] + 1)
    return rank


def _path(x1: float, y1: float, x2: float, y2: float) -> str:
    if x2 > x1:
        middle = (x1 + x2) / 2
        return f"M{x1:.0f},{y1:.0f} C{middle:.0f},{y1:.0f} {middle:.0f},{y2:.0f} {x2:.0f},{y2:.0f}"
    # Within a column or backwards: around, below the boxes' row.
    dip = max(y1, y2) + ROW_H * 0.6
    return f"M{x1:.0f},{y1:.0f} C{x1 + 80:.0f},{dip:.0f} {x2 - 80:.0f},{dip:.0f} {x2:.0f},{y2:.0f}"


def svg(arcs: list[Arc], link) -> str:
    """The graph as an inline <svg>; `link(node)` gives a node's page (or None)."""
    if not arcs:
        return '<p class="empty">No traffic seen yet.</p>'
    arcs = sorted(arcs, key=lambda a: -a.weight)
    nodes: list[str] = []
    for arc in arcs:
        for node in (arc.src, arc.dst):
            if node not in nodes and len(nodes) < MAX_NODES:
                nodes.append(node)
    shown = [a for a in arcs if a.src in nodes and a.dst in nodes]
    nodes.sort()
    rank = _ranks(nodes, shown)
    columns: dict[int, list[str]] = {}
    for node in nodes:
        columns.setdefault(rank[node], []).append(node)
    where = {node: (MARGIN + column * COLUMN_W, MARGIN + row * ROW_H)
             for column, members in columns.items() for row, node in enumerate(members)}
    width = MARGIN * 2 + (max(columns) + 1) * COLUMN_W - (COLUMN_W - BOX_W)
    height = MARGIN * 2 + max(len(m) for m in columns.values()) * ROW_H + ROW_H
    parts = [f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="call graph">',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>']
    for arc in shown:
        (sx, sy), (dx, dy) = where[arc.src], where[arc.dst]
        if arc.src == arc.dst:
            d = (f"M{sx + BOX_W - 30},{sy} C{sx + BOX_W - 30},{sy - 30} {sx + BOX_W + 30},{sy - 10} "
                 f"{sx + BOX_W},{sy + 12}")
            lx, ly = sx + BOX_W + 4, sy - 8
        else:
            x1, y1, x2, y2 = sx + BOX_W, sy + BOX_H / 2, dx, dy + BOX_H / 2
            d = _path(x1, y1, x2, y2)
            lx, ly = (x1 + x2) / 2, (y1 + y2) / 2 - 4 if x2 > x1 else max(y1, y2) + ROW_H * 0.45
        kind = "secured" if arc.secured else "plain"
        title = f"{arc.src} → {arc.dst}: {arc.label}{', mTLS' if arc.secured else ', not mTLS'}"
        parts.append(f'<g class="arc {kind}"><title>{escape(title)}</title>'
                     f'<path d="{d}" marker-end="url(#arrow)"/>'
                     f'<text x="{lx:.0f}" y="{ly:.0f}" text-anchor="middle">'
                     f'{"mTLS " if arc.secured else ""}{escape(arc.label)}</text></g>')
    for node in nodes:
        x, y = where[node]
        namespace, _, name = node.partition("/") if "/" in node else ("", "", node)
        box = (f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6"/>'
               f'<text x="{x + 8}" y="{y + 15}" class="ns">{escape(namespace)}</text>'
               f'<text x="{x + 8}" y="{y + 32}" class="name">{escape(name[:28])}</text>')
        href = link(node)
        parts.append(f'<a href="{escape(href)}" class="node">{box}</a>' if href else f'<g class="node">{box}</g>')
    parts.append("</svg>")
    hidden = len({a.src for a in arcs} | {a.dst for a in arcs}) - len(nodes)
    note = f'<p class="note">{hidden} more workloads not drawn (the busiest are).</p>' if hidden > 0 else ""
    return "".join(parts) + note
