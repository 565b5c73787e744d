"""Delivery: the durable spool, its dispatcher and the platforms' destinations."""
