"""The benchmark harness: per-node mode vs sidecar mode vs no mesh vs HAProxy."""
