"""Workload identity: trust roots, per-ServiceAccount certificates, TLS contexts."""
