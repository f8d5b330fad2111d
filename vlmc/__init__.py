"""vlmc: compile vision-language models for phones and edge devices."""
__version__ = "0.1.0"
