"""Exceptions raised by the library. The CLI turns every PoetgenError into `Error: ...` and exit code 1."""


class PoetgenError(Exception):
    """Base class for errors caused by user input or the environment, never by a bug."""


class CorpusError(PoetgenError):
    """A source could not be read: missing, binary, undecodable, malformed, or empty."""


class VocabError(PoetgenError):
    """Text holds symbols the vocabulary does not know, or a vocabulary file is invalid."""


class DatasetError(PoetgenError):
    """A prepared dataset is missing, incomplete, or would be overwritten."""


class ConfigError(PoetgenError):
    """A configuration value, preset, or config file is invalid."""


class CheckpointError(PoetgenError):
    """A checkpoint is missing, corrupt, unsafe, or from an incompatible format version."""


class TrainingError(PoetgenError):
    """Training cannot start or cannot go on (zero batches, NaN loss, run directory in use, ...)."""


class SampleError(PoetgenError):
    """Sampling was asked for something impossible (unknown prime characters, conflicting constraints, ...)."""


class DownloadError(PoetgenError):
    """A corpus download failed or did not verify."""
