"""Flexible storage: where the model is cut, the client's stand-in body, the wire format, credentials and the service engine."""
