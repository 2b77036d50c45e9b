"""Inbound authorization: who may connect to a meshed pod, decided at its destination."""
