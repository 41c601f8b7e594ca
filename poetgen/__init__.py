"""poetgen: character-level recurrent language models for poetry and any other text.

The package is importable without torch; modules that need it import it themselves.
"""

__version__ = "0.1.0"
