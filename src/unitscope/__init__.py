"""unitscope: find, name, measure and causally test the interpretable units inside neural networks."""

from .corpus import Corpus
from .dictionaries import Dictionary, load_dictionary
from .dictionaries.train import TrainConfig, train
from .errors import UnitscopeError
from .record import record
from .store import Store
from .subject import Subject, load_subject

__version__ = "0.1.0"
__all__ = ["Corpus", "Dictionary", "Store", "Subject", "TrainConfig", "UnitscopeError", "load_dictionary",
           "load_subject", "record", "train", "__version__"]
