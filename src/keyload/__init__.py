"""keyload: load application keys into fleets of security units over KLP1.

The layers, top to bottom: ``cli`` -> ``service`` -> ``station`` -> ``units`` /
``transports`` -> ``records`` -> ``core``. ``core`` is pure (no I/O); ``records`` holds the
SQL helpers of the record databases; ``units`` holds the authority and unit roles over
stores; ``transports`` carry APDU bytes; ``station`` customizes whole sets; ``service``
serves the authority over HTTPS. Beside them, ``lab`` starts what demos, tests and
benchmarks need (SoftHSM2, pcscd, PostgreSQL, virtual cards); only ``cli`` imports it.
"""

__version__ = "0.1.0"
