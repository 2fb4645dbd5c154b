"""Test support that ships with the package: loopback servers standing in for remote services."""
