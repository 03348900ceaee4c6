"""The run directory on disk (marker, lock, configuration snapshots) and a trained run read from it."""
