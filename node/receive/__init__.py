"""Stage 1, receive: the DICOM listener (plain and TLS) and the DICOMweb poller, into the spool."""
