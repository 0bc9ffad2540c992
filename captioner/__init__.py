"""captioner: CNN encoder + recurrent decoder image captioning.

Data flows one way: data -> transform -> encoder -> features (cached) -> decoder -> search -> metrics.
"""
__all__ = ["Caption", "Captioner"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Imported on first use, so that `captioner --help` and argument errors answer without importing torch (3 s).
    if name in __all__:
        from . import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'captioner' has no attribute {name!r}")
