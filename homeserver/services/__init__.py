"""Services: what happens when someone joins, sends, syncs. Above storage, below transports."""
