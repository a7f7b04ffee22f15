"""What the workflow makes from the masks: measurements, QC, evaluation, overlays, report. Imports no torch."""
