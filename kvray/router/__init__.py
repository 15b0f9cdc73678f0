"""Routing: the replica book, the policies behind one interface, the dispatcher, and the Serve
request-router plug-in (``serve_router``, the only module here that imports Ray). Importing the
package registers the built-in policies."""
from kvray.router import baselines, least_load, slo_aware  # noqa: F401  (register their policies)
