"""DICOM networking adapters: the listener (SCP: C-ECHO, C-STORE, Study Root C-FIND), the sender (SCU), the
worklist's C-FIND and HTTP views, the per-association collector and the TCP_NODELAY helper."""
