"""mtlrec: multi-task learning recommender systems."""

from mtlrec.errors import ArtifactError, ConfigError, DataError, MtlrecError

__version__ = "0.1.0"

__all__ = ["ArtifactError", "ConfigError", "DataError", "MtlrecError", "__version__"]
