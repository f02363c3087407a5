"""Management commands of the shared FHIR core."""
