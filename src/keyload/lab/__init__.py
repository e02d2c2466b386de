"""The lab: what demos, tests and benchmarks start around keyload, never the product itself.

A private SoftHSM2 token (:mod:`~keyload.lab.softhsm`), pcscd with the vpcd readers
(:mod:`~keyload.lab.pcscd`), a throw-away PostgreSQL server (:mod:`~keyload.lab.pgserver`)
and the card side of an emulated unit or authority served to vpcd (:mod:`~keyload.lab.cards`:
a card OS, one virtual card or a feeder). The product's own layers (``core``, ``units``,
``transports``, ``station``, ``service``) never import it; only the CLI's demo and
``unit serve-card`` commands do, as the top layer.
"""
