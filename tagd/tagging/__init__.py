"""Tagging: from an origin's tracking header and the visit to events for the platforms."""
