"""Tests of what an operator deploys: Dockerfile, compose.yaml and the gateway configs."""

import pytest

# The gateway tests' shared checks (gateways.py) assert with pytest's detailed messages.
pytest.register_assert_rewrite("tests.deploy.gateways")
