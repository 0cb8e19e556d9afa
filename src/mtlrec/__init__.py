"""mtlrec: multi-task learning recommender systems.

    import mtlrec
    result = mtlrec.train("config.yaml", out="runs/a")     # one model, every task
    predictor = mtlrec.Predictor.load("runs/a")             # probabilities, classes, top-K
"""

from mtlrec.config import Config, load_config
from mtlrec.errors import ArtifactError, ConfigError, DataError, MtlrecError
from mtlrec.predict import Predictor, evaluate_run
from mtlrec.training.trainer import TrainResult, train

__version__ = "0.1.0"

__all__ = ["ArtifactError", "Config", "ConfigError", "DataError", "MtlrecError", "Predictor", "TrainResult",
           "__version__", "evaluate_run", "load_config", "train"]
