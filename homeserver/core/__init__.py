"""The event core: room versions, events, redaction, format checks, authorisation
rules and state resolution. Pure functions: no I/O, no storage, no reactor."""
