"""Pure protocol and crypto for KLP1 (PROTOCOL.md): no I/O, no logging of values."""
