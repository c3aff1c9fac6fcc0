"""Exceptions dfgen raises on purpose."""


class DfgenError(Exception):
    """Base class of dfgen's own errors."""


class ConfigError(DfgenError, ValueError):
    """A kernel config (or a file holding configs) is malformed or infeasible."""


class InputError(DfgenError, ValueError):
    """An argument of deltaformer_attn has the wrong shape, dtype, device or layout."""
