"""Tests that run docker-compose.yml for real on a local Docker engine."""
