"""Stage 4, outputs: derived objects written from processed pixels (Secondary Capture, PNG, ...), their UIDs and names."""
