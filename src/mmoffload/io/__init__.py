"""Files in and out: crash-safe outputs, runs staged as a unit, and the one input opener."""
