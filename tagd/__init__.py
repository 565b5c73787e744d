"""tagd: a reverse proxy that turns an origin's tracking header into server-side ad events."""

__version__ = "0.1.0"
