"""switchprune: learn which neurons a network needs, then ship the smaller network."""
