"""GPU fast paths for the pipeline stages, one concern per module; import from the modules
themselves (this package re-exports nothing)."""
