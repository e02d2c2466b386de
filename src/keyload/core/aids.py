"""KLP1's card applications and commands (docs/protocol.md §5): AIDs and INS codes.

Both applications are selected by AID with ``SELECT`` (``00 A4 04 00``); the AIDs are
``F0`` followed by ASCII ``KLP1EI`` (unit) and ``KLP1AS`` (authority card). The other
commands are proprietary (CLA ``80``).

>>> AID_UNIT[1:].decode(), AID_AUTHORITY[1:].decode()
('KLP1EI', 'KLP1AS')
"""

from __future__ import annotations

AID_AUTHORITY = bytes.fromhex("F04B4C50314153")
AID_UNIT = bytes.fromhex("F04B4C50314549")
INS_SELECT, INS_INIT, INS_EXPORT, INS_IMPORT, INS_STATUS = 0xA4, 0x10, 0x12, 0x14, 0x16
INS_GENERATE_KEY, INS_PUT_CERTIFICATE = 0x18, 0x1A  # suite 0x03 enrolment (§10.2)

#: What each command is called in logs (never its data).
COMMAND_NAMES = {INS_SELECT: "SELECT", INS_INIT: "INITIALIZE DOWNLOAD", INS_EXPORT: "EXPORTKEY",
             INS_IMPORT: "IMPORTKEY", INS_STATUS: "GET SLOT STATUS",
             INS_GENERATE_KEY: "GENERATE UNIT KEY", INS_PUT_CERTIFICATE: "PUT CERTIFICATE"}
