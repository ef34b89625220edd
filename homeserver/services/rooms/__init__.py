"""Rooms: in-memory room state, building and persisting events, creation, membership."""
