"""Records at rest: the SQL helpers every record database of keyload shares.

Which store a ``--journal`` / ``--state`` value names (a SQLite file or a PostgreSQL URL),
opening a SQLite record database and grouping its commits (:mod:`~keyload.records.sql`),
and reading one so that a damaged file or row is one error naming the file
(:mod:`~keyload.records.stored`); a PostgreSQL URL without its password and a failed
connection as one line (:mod:`~keyload.records.postgres`, which needs psycopg). The
records themselves: the one hash-chained audit log, on SQLite or PostgreSQL
(:mod:`~keyload.records.audit`), the authority's export records
(:mod:`~keyload.records.exportlog`), and the ledger's entries with their one verifier
(:mod:`~keyload.records.ledger`). It depends on ``core`` only, so the units, the station
and the service can all use it.
"""
