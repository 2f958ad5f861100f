"""DICOM networking adapters: the listener (SCP) and the sender (SCU)."""
