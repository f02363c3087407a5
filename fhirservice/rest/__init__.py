"""HTTP plumbing of the FHIR API: content negotiation, rendering, views, routes."""
