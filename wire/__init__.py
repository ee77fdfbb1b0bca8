"""The API's wire format: the request and response bodies the service speaks and the client
reads (``wire.schemas``), and the filter language they carry (``wire.filters``).

Pydantic only, and nothing else of this project, so that the client (``cots.client``, the
``client`` extra) needs neither the service nor the indexer. The service validates requests
and serialises responses with these same classes, so both ends agree on every field.
"""
