"""The S3 HTTP API of the gateway."""
