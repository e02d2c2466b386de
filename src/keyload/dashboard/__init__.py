"""``keyload dashboard``: a read-only web page over a home's records.

:mod:`.state` gathers what the page shows (campaigns from the journal, the ledger, the
audit chain, and a running service's health and counters) as one JSON document;
:mod:`.app` serves it (``GET /api/state``) with the page and its script from ``static/``;
:mod:`.serve` runs that on uvicorn, on loopback in plain HTTP, elsewhere in HTTPS with
the service's mutual TLS and policy. Nothing here writes a journal or a store, and no
secret is read: receipts that only the authority can verify are counted as such.

It sits above ``station`` and ``service`` (it reads the station's records and uses the
service's TLS, identity and policy) and below ``cli``.
"""
