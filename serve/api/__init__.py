"""The HTTP API: FastAPI app, request/response schemas and the error table."""
