"""The lab: simulated Kubernetes nodes and pods in network namespaces on one machine."""
