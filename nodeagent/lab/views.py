"""Terminal tables for `lab status`."""

from rich.console import Console
from rich.table import Table


def _labels(labels: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def print_status(status: dict, console: Console) -> None:
    nodes = Table(title="Nodes", title_justify="left")
    for column in ("NODE", "PODS", "POD CIDR", "ADMIN", "AGENT"):
        nodes.add_column(column)
    for n in status["nodes"]:
        nodes.add_row(n["name"], str(n["pods"]), n["pod_cidr"], n["admin"], n["agent"])

    pods = Table(title="Pods", title_justify="left")
    for column in ("NAMESPACE", "POD", "NODE", "IP"):
        pods.add_column(column)
    pods.add_column("LABELS", overflow="fold")
    for p in status["pods"]:
        pods.add_row(p["namespace"], p["name"], p["node"], p["ip"], _labels(p["labels"]))

    services = Table(title="Services", title_justify="left")
    for column in ("NAMESPACE", "SERVICE", "CLUSTER-IP", "PORT", "ENDPOINTS"):
        services.add_column(column)
    for s in status["services"]:
        services.add_row(s["namespace"], s["name"], s["cluster_ip"], f"{s['port']}->{s['target_port']}",
                         " ".join(s["endpoints"]) or "<none>")

    for table in (nodes, pods, services):
        console.print(table)
    console.print(f"cluster manifests: {status['cluster_dir']}   mesh: {status['mesh']}")
