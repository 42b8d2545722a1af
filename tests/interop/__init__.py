"""Interoperability with third-party DICOM software and deployment-file checks."""
