"""The agent's view of the cluster: pods, services, endpoints, opt-in."""
