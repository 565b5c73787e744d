"""The reverse proxy: the visitors' site, the resource that forwards, and the origin's client."""
