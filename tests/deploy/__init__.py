"""Tests of what an operator deploys: Dockerfile and compose.yaml."""
