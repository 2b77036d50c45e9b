"""The eBPF data path: programs in bpf/, loaded by loader.py, used through pinned objects."""
