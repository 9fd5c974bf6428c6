"""DICOM networking (SCP/SCU) and the DICOM objects the gateway creates (imaging issue)."""
