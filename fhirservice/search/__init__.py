"""FHIR search: index extraction at write time, query parsing and execution at read time."""
