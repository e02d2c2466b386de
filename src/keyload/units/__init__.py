"""The two KLP1 roles, authority (AS) and unit (EI), over small store interfaces."""
