"""Feature extraction and anomaly detectors.  Imports ``parsers`` (for the event schema) only."""
