"""Operation API: business $operations with transactional, version-checked execution."""
