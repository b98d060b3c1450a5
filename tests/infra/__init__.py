"""Tests of the local infrastructure helpers (services/infra)."""
