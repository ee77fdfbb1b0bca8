"""The HTTP API: one router per resource.

Routers carry their whole prefix (``/v1/...``) rather than being nested under a ``/v1`` router,
so a route's own path is its full template, which the per-route metrics use as a label.
"""

API_PREFIX = "/v1"
