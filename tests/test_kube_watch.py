"""The Kubernetes watcher against an API server double with real behaviour."""

import base64
import random
import time

import pytest
import yaml

from kube_double import ApiDouble
from nodeagent.cluster.kube import (ApiClient, ApiError, ConfigError, KubeConfig, KubeSource, Reflector, Store,
                                    backoff_s)


def pod(name: str, ip: str, labels: dict | None = None, namespace: str = "default", node: str = "node0") -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "labels": labels or {}},
            "spec": {"nodeName": node, "serviceAccountName": "web", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip}}


@pytest.fixture
def api():
    double = ApiDouble()
    yield double
    double.close()


def client_for(api: ApiDouble, token: str = "secret-token") -> ApiClient:
    return ApiClient(KubeConfig(api.url, token=token), timeout_s=2)


def wait_for(predicate, what: str, timeout_s: float = 10):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def names(store: Store, kind: str = "pods") -> set[str]:
    return {key.rpartition("/")[2] for key in store.keys(kind)}


@pytest.fixture
def reflector(api):
    started = []

    def start(kind: str = "pods") -> tuple[Reflector, Store]:
        store = Store()
        r = Reflector(client_for(api), kind, store, rng=random.Random(1), sleep=lambda s: time.sleep(min(s, 0.05)))
        r.start()
        started.append(r)
        return r, store

    yield start
    for r in started:
        r.stop()


def test_list_then_watch_sees_adds_updates_and_deletes(api, reflector):
    api.put("pods", pod("a", "10.244.0.5"))
    r, store = reflector()
    wait_for(lambda: names(store) == {"a"}, "the list")
    api.put("pods", pod("b", "10.244.0.6"))
    api.put("pods", pod("a", "10.244.0.5", {"nodeagent.io/mesh": "enabled"}))
    api.delete("pods", "default", "b")
    wait_for(lambda: names(store) == {"a"} and store.record("pods", "default/a").labels, "the events")
    assert r.lists == 1


def test_bookmarks_move_the_resource_version_without_changes(api, reflector):
    r, store = reflector()
    wait_for(lambda: r.resource_version is not None, "the list")
    api.put("services", {"metadata": {"name": "other-kind", "namespace": "default"}, "spec": {}})
    wait_for(lambda: int(r.resource_version) == api.rv, "a bookmark at the latest version")
    assert names(store) == set()


def test_a_dropped_watch_resumes_from_its_version_and_loses_nothing(api, reflector):
    api.put("pods", pod("a", "10.244.0.5"))
    api.drop_watches_after = 2  # every watch connection is cut after two events
    r, store = reflector()
    wait_for(lambda: names(store) == {"a"}, "the list")
    for i in range(10):
        api.put("pods", pod(f"p{i}", f"10.244.1.{i + 1}"))
    api.delete("pods", "default", "p3")
    wait_for(lambda: names(store) == {"a"} | {f"p{i}" for i in range(10)} - {"p3"}, "every event")
    assert r.lists == 1 and r.watches >= 5  # resumed by watching again, never by relisting


def test_410_gone_relists_and_removes_what_was_deleted_meanwhile(api, reflector):
    for name in ("a", "b", "c"):
        api.put("pods", pod(name, "10.244.0.5"))
    r, store = reflector()
    wait_for(lambda: names(store) == {"a", "b", "c"}, "the list")
    api.delay_s = 0.5  # hold the reconnect while the cluster moves on and history is compacted
    api.disconnect_watches()
    api.delete("pods", "default", "b")
    api.put("pods", pod("d", "10.244.0.9"))
    api.compact()
    api.delay_s = 0
    wait_for(lambda: names(store) == {"a", "c", "d"}, "the relist")
    assert r.lists >= 2


def test_slow_responses_are_retried_with_backoff_until_they_succeed(api, reflector):
    api.put("pods", pod("a", "10.244.0.5"))
    api.delay_s = 3.0  # longer than the client's 2 s timeout
    r, store = reflector()
    wait_for(lambda: r.failures >= 1, "a timeout")
    api.delay_s = 0
    wait_for(lambda: names(store) == {"a"}, "the list after the slow period")


def test_pagination_lists_everything(api):
    for i in range(1203):
        api.put("pods", pod(f"p{i:04d}", "10.244.0.5"))
    items, rv = client_for(api).list("/api/v1/pods", {})
    assert len({o["metadata"]["name"] for o in items}) == 1203 and rv == str(api.rv)


def test_a_wrong_token_is_a_clear_error(api):
    with pytest.raises(ApiError, match="401"):
        client_for(api, token="wrong").get("/api/v1/pods")


def test_backoff_is_jittered_exponential_and_capped():
    rng = random.Random(3)
    samples = [[backoff_s(attempt, rng) for _ in range(200)] for attempt in range(10)]
    assert all(0 <= s <= 0.5 for s in samples[0])
    assert max(samples[3]) <= 4.0 and max(samples[3]) > 2.0
    assert max(samples[9]) <= 30.0


def test_the_source_builds_a_cluster_view_and_follows_label_changes_live(api):
    api.put("namespaces", {"metadata": {"name": "default", "labels": {}}})
    api.put("pods", pod("web-1", "10.244.0.7", {"app": "web"}))
    api.put("services", {"metadata": {"name": "web", "namespace": "default"},
                         "spec": {"clusterIP": "10.96.0.7", "selector": {"app": "web"},
                                  "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})
    api.put("endpointslices", {
        "metadata": {"name": "web-abc", "namespace": "default", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.0.7"], "conditions": {"ready": True}},
                      {"addresses": ["10.244.0.8"], "conditions": {"ready": False}}]})
    source = KubeSource(client_for(api))
    try:
        latest = None

        def refreshed():
            nonlocal latest
            latest = source.poll() or latest  # poll() is None when nothing changed
            return latest

        wait_for(lambda: refreshed() and "default/web" in latest.services, "the view")
        service = latest.services["default/web"]
        (endpoint,) = latest.endpoints(service, service.ports[0])  # the unready one is left out
        assert (endpoint.ip, endpoint.port, endpoint.pod.name) == ("10.244.0.7", 8080, "web-1")
        assert not latest.meshed(latest.pods["default/web-1"])
        api.put("namespaces", {"metadata": {"name": "default", "labels": {"nodeagent.io/mesh": "enabled"}}})
        wait_for(lambda: refreshed() and latest.meshed(latest.pods["default/web-1"]), "namespace opt-in")
        api.put("pods", pod("web-1", "10.244.0.7", {"app": "web", "nodeagent.io/mesh": "disabled"}))
        wait_for(lambda: refreshed() and not latest.meshed(latest.pods["default/web-1"]), "pod opt-out")
    finally:
        source.close()


def test_in_cluster_and_kubeconfig_configuration(tmp_path):
    (tmp_path / "token").write_text("tok\n")
    (tmp_path / "ca.crt").write_text("CA")
    config = KubeConfig.in_cluster({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
                                   tmp_path)
    assert (config.server, config.token, config.ca_pem) == ("https://10.96.0.1:443", "tok", "CA")
    with pytest.raises(ConfigError, match="not in a cluster"):
        KubeConfig.in_cluster({}, tmp_path)
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(yaml.safe_dump({
        "current-context": "lab",
        "contexts": [{"name": "lab", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [{"name": "c", "cluster": {"server": "https://api.test:6443",
                                               "certificate-authority-data": base64.b64encode(b"CA2").decode()}}],
        "users": [{"name": "u", "user": {"token": "tok2"}}]}))
    config = KubeConfig.from_kubeconfig(kubeconfig)
    assert (config.server, config.token, config.ca_pem) == ("https://api.test:6443", "tok2", "CA2")


def test_a_stream_cut_inside_a_chunk_is_a_failure_the_reflector_survives(api, reflector):
    api.put("pods", pod("a", "10.244.0.5"))
    api.drop_watches_after, api.cut_mid_chunk = 1, True  # each watch: one event, then half of the next
    r, store = reflector()
    wait_for(lambda: names(store) == {"a"}, "the list")
    for i in range(6):
        api.put("pods", pod(f"p{i}", f"10.244.1.{i + 1}"))
    wait_for(lambda: names(store) == {"a"} | {f"p{i}" for i in range(6)}, "every event, one watch at a time")
    assert r.is_alive() and r.failures >= 1 and "IncompleteRead" in r.last_error


def test_watches_that_end_at_once_are_retried_with_backoff_not_in_a_loop(api):
    api.end_watches_at_once = True
    store = Store()
    r = Reflector(client_for(api), "pods", store, rng=random.Random(1))
    r.start()
    try:
        time.sleep(3)
        watches = sum(1 for path, params in api.requests if params.get("watch") == "1")
        assert 1 <= watches <= 12, watches  # without backoff: thousands in 3 s
        assert "no event" in r.last_error
    finally:
        r.stop()


def test_a_410_relists_after_a_wait_and_watch_timeouts_are_jittered(api):
    waits = []
    api.put("pods", pod("a", "10.244.0.5"))
    api.drop_watches_after = 1
    store = Store()
    r = Reflector(client_for(api), "pods", store, rng=random.Random(2),
                  sleep=lambda s: (waits.append(s), time.sleep(min(s, 0.05))))
    r.start()
    try:
        wait_for(lambda: names(store) == {"a"}, "the list")
        for i in range(5):
            api.put("pods", pod(f"p{i}", f"10.244.1.{i + 1}"))
        wait_for(lambda: len(names(store)) == 6, "the events")
        timeouts = [int(p["timeoutSeconds"]) for _, p in api.requests if p.get("watch") == "1"]
        assert len(set(timeouts)) > 1 and all(300 <= t < 600 for t in timeouts)
        api.drop_watches_after = None
        waits.clear()
        api.delay_s = 0.3
        api.disconnect_watches()
        api.put("pods", pod("late", "10.244.1.9"))  # history moves on and is compacted away
        api.compact()
        api.delay_s = 0
        wait_for(lambda: r.lists >= 2, "the relist")
        assert waits, "relisted after a 410 without waiting"
        lists = [p for _, p in api.requests if p.get("watch") != "1"]
        assert lists[0].get("resourceVersion") == "0"  # the first from the server's cache
        assert "resourceVersion" not in lists[-1]  # after a 410: a consistent read
        assert lists[0]["fieldSelector"] == "status.phase!=Succeeded,status.phase!=Failed"
    finally:
        r.stop()


def test_a_rotated_token_file_is_read_again(api, tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text("first\n")
    api.token = "first"
    api.put("pods", pod("a", "10.244.0.5"))
    config = tmp_path / "config"
    config.write_text(yaml.safe_dump({
        "current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [{"name": "c", "cluster": {"server": api.url}}],
        "users": [{"name": "u", "user": {"tokenFile": "secrets/token"}}]}))  # relative to the kubeconfig
    store = Store()
    r = Reflector(ApiClient(KubeConfig.from_kubeconfig(config), timeout_s=2), "pods", store,
                  sleep=lambda s: time.sleep(min(s, 0.05)))
    r.start()
    try:
        wait_for(lambda: names(store) == {"a"}, "the list")
        api.token = "second"  # the kubelet wrote a new token; the old one is no longer accepted
        (tmp_path / "secrets" / "token").write_text("second\n")
        api.disconnect_watches()
        api.put("pods", pod("b", "10.244.0.6"))
        wait_for(lambda: names(store) == {"a", "b"}, "the watch with the new token")
    finally:
        r.stop()


def test_exec_credential_plugins_and_server_path_prefixes(api, tmp_path):
    api.prefix = "/k8s/clusters/c-1"
    api.token = "from-plugin-1"
    (tmp_path / "current").write_text("from-plugin-1")
    plugin = tmp_path / "bin" / "credential"
    plugin.parent.mkdir()
    plugin.write_text(f"""#!/bin/sh
echo run >> {tmp_path}/runs
test "$PLUGIN_ENV" = set || exit 3
printf '{{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
"status": {{"token": "%s", "expirationTimestamp": "2999-01-01T00:00:00Z"}}}}' "$(cat {tmp_path}/current)"
""")
    plugin.chmod(0o755)
    config = tmp_path / "config"
    config.write_text(yaml.safe_dump({
        "current-context": "c", "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
        "clusters": [{"name": "c", "cluster": {"server": api.url + "/k8s/clusters/c-1/"}}],
        "users": [{"name": "u", "user": {"exec": {
            "apiVersion": "client.authentication.k8s.io/v1", "command": "./bin/credential",
            "env": [{"name": "PLUGIN_ENV", "value": "set"}], "interactiveMode": "Never"}}}]}))
    client = ApiClient(KubeConfig.from_kubeconfig(config), timeout_s=2)
    api.put("pods", pod("a", "10.244.0.5"))
    assert [o["metadata"]["name"] for o in client.list("/api/v1/pods", {})[0]] == ["a"]
    client.get("/api/v1/pods")
    assert (tmp_path / "runs").read_text().count("run") == 1  # kept until it expires
    api.token = "from-plugin-2"  # revoked: the 401 makes the client ask the plugin again
    (tmp_path / "current").write_text("from-plugin-2")
    client.get("/api/v1/pods")
    assert (tmp_path / "runs").read_text().count("run") == 2
    assert all(path.startswith("/k8s/clusters/c-1/") for path, _ in api.requests)


def test_a_kind_unwatched_beyond_the_bound_is_a_problem_until_it_recovers(api):
    api.put("pods", pod("a", "10.244.0.5"))
    source = KubeSource(client_for(api), stale_after_s=0.5)
    try:
        wait_for(lambda: source.synced() and source.poll() is not None, "the first view")
        assert source.problems() == []
        api.forbidden = {"pods"}  # a broken RoleBinding: every new watch is refused
        api.disconnect_watches()
        wait_for(lambda: any(p.startswith("pods:") and "403" in p for p in source.problems()), "a problem")
        api.forbidden = set()
        wait_for(lambda: source.problems() == [], "recovery", timeout_s=40)
    finally:
        source.close()
