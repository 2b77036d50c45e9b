"""/debug/memory's report (agent/memory.py), read in this process: the numbers move with what
the process holds, and every table it names resolves on a real Proxy (a renamed attribute would
show as None here, not as a silently missing row in a soak)."""

import asyncio
import json
import subprocess
import sys
import threading

from nodeagent.agent import memory
from nodeagent.identity.ca import Authority
from test_mtls import CLIENT, identities


def test_the_report_reads_the_kernel_glibc_and_python():
    report = memory.report(None)
    assert report["process"]["rss_kib"] > 0 and report["process"]["anon_kib"] > 0
    heap = report["allocator"]  # glibc 2.36 on this machine: mallinfo2 is there
    assert heap["heap_kib"] >= heap["in_use_kib"] > 0
    assert report["python"]["allocated_blocks"] > 0 and report["python"]["types"]
    assert report["tables"] == {} and report["tracemalloc"] is None and "trim" not in report
    arenas = heap["arenas"]  # per arena, adding up to mallinfo2's total
    assert arenas[0]["arena"] == 0 and all(a["heap_kib"] >= a["free_kib"] >= 0 for a in arenas)
    assert abs(sum(a["heap_kib"] for a in arenas) - heap["heap_kib"]) <= max(64, heap["heap_kib"] // 20)


class Held:
    pass


def test_objects_held_show_in_the_type_counts_and_the_heap():
    before = memory.report(None)
    held = [Held() for _ in range(50_000)]
    blob = [bytearray(1000) for _ in range(20_000)]  # ~20 MB in glibc's small blocks (below its mmap threshold)
    after = memory.report(None)
    assert after["python"]["types"]["Held"] == 50_000 and "Held" not in before["python"]["types"]
    assert after["python"]["allocated_blocks"] - before["python"]["allocated_blocks"] >= 70_000
    assert after["allocator"]["in_use_kib"] - before["allocator"]["in_use_kib"] >= 19_000
    del held, blob


def test_tracing_is_off_unless_the_environment_asks_and_then_names_the_sites():
    code = """
import json
from nodeagent.agent import memory
assert not memory.start_tracing({})
assert memory.start_tracing({"NODEAGENT_TRACEMALLOC": "1"})
kept = [bytes(2000) + bytes([i % 256]) for i in range(5000)]  # the line to be named
print(json.dumps(memory.traced()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    traced = json.loads(out)
    assert traced["current_kib"] >= 9_000
    assert traced["top"][0]["where"] == "<string>:6" and traced["top"][0]["count"] >= 5000


def test_trim_reports_the_rss_before_and_after():
    trimmed = memory.report(None, trim_heap=True)["trim"]
    assert trimmed["rss_before_kib"] > 0 and trimmed["rss_after_kib"] > 0


def test_every_table_it_names_resolves_on_a_real_proxy():
    from nodeagent.proxy.server import Proxy

    anchor = Authority.new_anchor("cluster.local")
    workload = identities(anchor.new_issuer("cluster.local"), anchor.certificate_pem(), CLIENT)

    async def scenario():
        proxy = Proxy(None, workload)
        try:
            return memory.proxy_tables(proxy)
        finally:
            proxy.close_listeners()

    tables = asyncio.run(scenario())
    missing = [name for name, size in tables.items() if size is None and name != "spans_queued"]  # no tracer: none
    assert not missing, missing
    assert tables["connections_open"] == 0 and tables["outbound_http1_idle"] == 0
    assert tables["metric_samples"] >= 0 and isinstance(tables["metric_samples_by_family"], dict)


def test_a_thread_that_allocates_shows_as_an_arena_of_its_own():
    before = len(memory.arenas())
    held = []
    worker = threading.Thread(target=lambda: held.extend(bytearray(1000) for _ in range(20_000)))
    worker.start()
    worker.join()
    after = memory.arenas()
    assert len(after) >= max(before, 2) and sum(a["heap_kib"] for a in after[1:]) >= 19_000
    del held
