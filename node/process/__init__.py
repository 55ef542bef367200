"""Stage 3, process: routing, input series, rendering (the imaging library's physics) per pipeline."""
