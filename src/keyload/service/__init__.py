"""The network face of keyload: remote key download over HTTPS (thin over station/units).

- :mod:`.app`: the ASGI application (EXPORTKEY, receipts, health, metrics, OpenAPI);
- :mod:`.server`: uvicorn with mutual TLS and the ASGI TLS extension;
- :mod:`.policy`: which client (certificate CN) may ask for which sets and REF1s; limits;
- :mod:`.store`: replay cache, ledger, rate counters, audit (SQLite, or PostgreSQL shared
  by several instances);
- :mod:`.client`: the field-side client (``keyload fetch``);
- :mod:`.pki`: a test CA, server and client certificates (``keyload pki``).
"""
