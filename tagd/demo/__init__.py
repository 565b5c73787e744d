"""A runnable demo: a tiny example shop behind tagd, both in one process."""
