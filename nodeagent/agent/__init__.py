"""The agent: one per node; it loads the data path, follows the cluster and runs the proxy."""
