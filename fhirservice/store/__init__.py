"""The versioned resource store: services (writes) and selectors (reads) over the ORM models."""
