"""Typed async clients, one per service; the only place generated stubs are called."""
