"""Writers for the node's outputs (derived DICOM Secondary Captures, ...)."""
