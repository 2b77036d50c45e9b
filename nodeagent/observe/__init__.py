"""stat, top and tap: what operators see, from the agents' admin endpoints."""
