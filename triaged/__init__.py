"""triaged: a DICOM node that triages chest CT for COVID-19. Research use only, not for diagnosis."""

__version__ = "0.1.0"
