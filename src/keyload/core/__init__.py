"""Pure protocol and crypto for KLP1 (docs/protocol.md): no I/O, no logging of values."""
