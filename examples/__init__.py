"""Examples of using the quota services (see docs/client.md); not part of the installed package."""
