"""The ``validate`` stage: great-expectations checks on the ingested frames; failures quarantined."""

from mlipops.quality.validate import frame_table, run, validate_frames

__all__ = ["frame_table", "run", "validate_frames"]
