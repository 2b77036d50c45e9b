"""`nodeagent stat`, `top` and `tap`: what operators see, read from the agents' admin ports."""

import click
from rich.console import Console

from nodeagent.lab import lab as lab_ops

admin_option = click.option("--admin", "admins", multiple=True,
                            help="An agent's admin address (repeatable). Default: the lab's agents, else "
                                 "127.0.0.1:4191.")


def _meshed_by_service() -> dict[str, str]:
    """'meshed/total' endpoint pods per Service, from the lab's cluster if one is up."""
    from nodeagent.cluster.files import ManifestDirSource

    try:
        view = ManifestDirSource(lab_ops.load().cluster_dir).poll()
    except lab_ops.LabError:
        return {}
    result = {}
    for service in view.services.values():
        pods = {e.pod.key: e.pod for port in service.ports for e in view.endpoints(service, port)}
        result[f"svc/{service.key}"] = f"{sum(view.meshed(p) for p in pods.values())}/{len(pods)}"
    return result


@click.command()
@admin_option
@click.option("--window", default=5.0, show_default=True, type=click.FloatRange(0.5, 600),
              help="Seconds between the two scrapes that rates are computed from.")
def stat(admins, window):
    """Per destination: meshed pods, success rate, RPS, latency percentiles, TCP connections."""
    import time

    from nodeagent.observe import admin_client, aggregate, views

    admins = list(admins) or admin_client.default_admins()

    def scrape_all():
        samples = []
        for admin in admins:
            try:
                samples += admin_client.scrape(admin)
            except OSError as e:
                raise click.ClickException(f"cannot scrape {admin}: {e}") from e
        return aggregate.totals_by_destination(samples)

    before = scrape_all()
    time.sleep(window)
    after = scrape_all()
    Console().print(views.stat_table(aggregate.stat_rows(before, after, window), window, _meshed_by_service()))


def _tap_threads(admins, filters, max_events, seconds, sink):
    """One reader thread per agent, each handing events to `sink`."""
    import threading

    from nodeagent.observe import admin_client

    def read(admin):
        try:
            for event in admin_client.tap_stream(admin, filters, max_events, seconds):
                sink(event)
        except (OSError, RuntimeError) as e:
            click.echo(f"tap {admin}: {e}", err=True)

    threads = [threading.Thread(target=read, args=(a,), daemon=True) for a in admins]
    for thread in threads:
        thread.start()
    return threads


tap_filters = [
    click.option("--namespace", help="Only requests from pods in this namespace."),
    click.option("--pod", help="Only requests from this pod."),
    click.option("--to", help="Only requests to destinations containing this (e.g. svc/default/http)."),
    click.option("--method", help="Only this HTTP method."),
    click.option("--path", help="Only paths starting with this."),
]


def _with_tap_filters(command):
    for option in reversed(tap_filters):
        command = option(command)
    return command


@click.command()
@admin_option
@_with_tap_filters
@click.option("--max", "max_events", default=100, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--duration", default=30.0, show_default=True, type=click.FloatRange(0.1, 3600))
def tap(admins, namespace, pod, to, method, path, max_events, duration):
    """Stream live request metadata (never bodies) as the proxies see it."""
    import queue

    from nodeagent.observe import admin_client, views

    events: queue.Queue = queue.Queue()
    filters = {"namespace": namespace, "pod": pod, "to": to, "method": method, "path": path}
    threads = _tap_threads(list(admins) or admin_client.default_admins(), filters, max_events, duration, events.put)
    shown = 0
    while shown < max_events and (any(t.is_alive() for t in threads) or not events.empty()):
        try:
            click.echo(views.tap_line(events.get(timeout=0.2)))
            shown += 1
        except queue.Empty:
            continue


@click.command()
@admin_option
@_with_tap_filters
@click.option("--duration", default=30.0, show_default=True, type=click.FloatRange(1, 3600))
def top(admins, namespace, pod, to, method, path, duration):
    """Live table of the busiest routes, from tap, refreshed every second."""
    import threading
    import time

    from rich.live import Live

    from nodeagent.observe import admin_client, aggregate, views

    events, lock = [], threading.Lock()

    def sink(event):
        with lock:
            events.append(event)

    filters = {"namespace": namespace, "pod": pod, "to": to, "method": method, "path": path}
    threads = _tap_threads(list(admins) or admin_client.default_admins(), filters, 1_000_000, duration, sink)
    end = time.monotonic() + duration
    with Live(views.top_table([]), refresh_per_second=1) as live:
        while time.monotonic() < end and any(t.is_alive() for t in threads):
            time.sleep(1)
            with lock:
                live.update(views.top_table(aggregate.roll_up(events)))


@click.command()
@admin_option
@click.option("--namespace", help="Only edges from or to this namespace.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def edges(admins, namespace, as_json):
    """Who talks to whom: source and destination workloads, the identities they presented, whether
    over mutual TLS, request and byte counts (from every agent's /edges)."""
    import json

    from nodeagent.observe import admin_client, views
    from nodeagent.observe import edges as edge_model

    reports = []
    for admin in list(admins) or admin_client.default_admins():
        try:
            reports.append(edge_model.from_document(admin_client.fetch_json(admin, "/edges")))
        except (OSError, ValueError) as e:
            raise click.ClickException(f"cannot read {admin}/edges: {e}") from e
    merged = [e for e in edge_model.merge(reports)
              if not namespace or namespace in (e.src_namespace, e.dst_namespace)]
    if as_json:
        click.echo(json.dumps([e.as_dict() for e in merged], indent=1))
    else:
        Console().print(views.edges_table(merged))


@click.command()
@admin_option
@click.option("--port", default=50750, show_default=True, type=click.IntRange(0, 65535),
              help="The local port to serve on (0: any free one).")
@click.option("--address", default="127.0.0.1", show_default=True, help="A loopback address to serve on.")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.5, 60),
              help="Seconds between polls of the agents.")
def dashboard(admins, port, address, interval):
    """The web console on localhost: namespaces, workloads, golden metrics, the call graph, live tap
    (read from the agents' admin ports; no Prometheus needed)."""
    from nodeagent.observe import admin_client, console

    try:
        server = console.serve(list(admins) or admin_client.default_admins(), address, port, interval)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot serve the console on {address}:{port}: {e}") from e
    host, bound = server.server_address[:2]
    click.echo(f"nodeagent console: http://{'localhost' if host == '127.0.0.1' else host}:{bound}/  (Ctrl-C stops it)",
               err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
