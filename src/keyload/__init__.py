"""keyload: load application keys into fleets of security units over KLP1.

The layers, top to bottom: ``cli`` -> ``station`` -> ``units`` / ``transports`` -> ``core``.
``core`` is pure (no I/O); ``units`` holds the authority and unit roles over stores;
``transports`` carry APDU bytes; ``station`` customizes whole sets.
"""

__version__ = "0.1.0"
