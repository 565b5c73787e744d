"""An example shop origin whose pages mark themselves with the tracking header.

It stands in for a shop's real web app in the demo and in the benchmark: cached-looking
HTML pages, each telling tagd which ad event it represents.
"""

from __future__ import annotations

import json

from twisted.web.resource import Resource

PRODUCTS = {
    "123": ("Espresso beans, 250 g", 3.5),
    "456": ("Ceramic cup", 12.0),
}

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>
<body><h1>{title}</h1>{body}
<p><a href="/">Home</a> &middot; <a href="/product/123">Beans</a> &middot;
<a href="/product/456">Cup</a> &middot; <a href="/checkout">Checkout</a></p>
{padding}</body></html>
"""


def page(title: str, body: str = "", size: int = 0) -> bytes:
    """An HTML page, padded with a comment up to about C{size} bytes (for benchmarks)."""
    html = PAGE.format(title=title, body=body, padding="")
    missing = size - len(html.encode("utf-8"))
    padding = f"<!-- {'x' * (missing - 9)} -->" if missing > 9 else ""
    return PAGE.format(title=title, body=body, padding=padding).encode("utf-8")


class _Page(Resource):
    isLeaf = True

    def __init__(self, body: bytes, tracking: dict | None, tracking_header: bytes) -> None:
        super().__init__()
        self._body = body
        self._tracking = json.dumps(tracking).encode("utf-8") if tracking else None
        self._tracking_header = tracking_header

    def _head(self, request) -> None:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"public, max-age=60")
        if self._tracking is not None:
            request.setHeader(self._tracking_header, self._tracking)

    def render_GET(self, request):
        self._head(request)
        return self._body

    def render_HEAD(self, request):
        """The head GET would give, its Content-Length included, and no body: one returned
        here would make Twisted log a warning and drop it."""
        self._head(request)
        request.setHeader(b"Content-Length", b"%d" % len(self._body))
        return b""


def shop_resource(tracking_header: bytes = b"Worker-Tracking", page_size: int = 0) -> Resource:
    """The example shop: a home page, two product pages and a checkout page."""
    root = _Page(
        page("Demo shop", "<p>Welcome.</p>", page_size),
        {"event_name": "PageView"},
        tracking_header,
    )
    root.isLeaf = False
    root.putChild(b"", root)
    products = Resource()
    root.putChild(b"product", products)
    for product_id, (name, price) in PRODUCTS.items():
        products.putChild(
            product_id.encode(),
            _Page(
                page(name, f"<p>{price:.2f} EUR</p>", page_size),
                {
                    "event_name": "ViewContent",
                    "custom_data": {"currency": "EUR", "value": price},
                    "contents": [{"id": product_id, "quantity": 1}],
                },
                tracking_header,
            ),
        )
    root.putChild(
        b"checkout",
        _Page(
            page("Checkout", "<p>Your basket.</p>", page_size),
            {"event_name": "InitiateCheckout", "custom_data": {"currency": "EUR", "value": 15.5}},
            tracking_header,
        ),
    )
    return root
