"""captioner: CNN encoder + recurrent decoder image captioning.

Data flows one way: data -> transform -> encoder -> features (cached) -> decoder -> search -> metrics.
"""
from .inference import Caption, Captioner

__all__ = ["Caption", "Captioner"]
__version__ = "0.1.0"
