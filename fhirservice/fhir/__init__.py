"""FHIR R4 knowledge of the service: the resource-type registry and content validation."""
