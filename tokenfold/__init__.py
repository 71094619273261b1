"""TokenFold: teach a language model to speak structure. See README.md and DEVELOPERS.md."""
__version__ = "0.1.0"
