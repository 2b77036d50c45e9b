"""nodeagent: an eBPF-accelerated, per-node service-mesh agent."""

__version__ = "0.1.0"

# Every object the project creates on a host carries this prefix, so a cleanup
# can find the leftovers of a crashed run.
PREFIX = "nalab"
