"""Kubernetes manifests for running nodeagent as a DaemonSet."""
