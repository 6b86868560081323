"""saex: does an SAE trained on a language model still explain its compressed version?"""

__version__ = "0.1.0"
