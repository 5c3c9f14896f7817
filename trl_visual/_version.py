"""The package's version, on the lowest floor so that any module may read it (``trl_visual.__version__``)."""

__version__ = "0.1.0.dev0"
