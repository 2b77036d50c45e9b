"""agent/gc_tuning.py: start-up's objects frozen once per process; what is made later is still
collected. Each case runs in a fresh interpreter (a freeze is for the whole process)."""

import json
import os
import subprocess
import sys

FREEZE = """
import gc, json
from nodeagent.agent import gc_tuning

class Node:
    pass

start_up = [Node() for _ in range(5000)]
first = gc_tuning.freeze_start_up()
again = gc_tuning.freeze_start_up()

# Cyclic garbage made after the freeze is collected as before (here by one collection).
gc.disable()
for _ in range(1000):
    a, b = Node(), Node()
    a.other, b.other = b, a
del a, b
collected = gc.collect()
gc.enable()

print(json.dumps({"first": first, "again": again, "frozen": gc.get_freeze_count(), "collected": collected,
                  "tracked": len(gc.get_objects())}))
"""


def run(env_extra: dict) -> dict:
    env = {**os.environ, **env_extra}
    done = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True, env=env, timeout=60,
                          check=True)
    return json.loads(done.stdout)


def test_start_up_objects_are_frozen_once_and_later_cycles_still_collected():
    result = run({})
    assert result["first"] == result["frozen"] and result["frozen"] > 5000
    assert result["again"] == 0  # once per process: nothing made later is ever frozen
    assert result["collected"] >= 2000  # the 1,000 cycles made after the freeze
    assert result["tracked"] < 5000  # a full collection walks only what came after, not start-up's


def test_the_environment_turns_it_off():
    result = run({"NODEAGENT_GC_FREEZE": "0"})
    assert result["first"] == 0 and result["frozen"] == 0
