"""The station: carries KLP1 messages between an authority and units, customizes sets.

It holds no secret and is not trusted (docs/protocol.md §1): everything it learns (KCVs,
receipts) is checked by the unit or the authority.
"""
