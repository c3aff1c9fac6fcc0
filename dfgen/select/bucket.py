"""A bucket: the class of calls one tuned config serves, and its one definition.

A bucket is a pass (fwd: the forward alone; fwd+bwd: a forward that saves for the
backward, and the backward; decode: one decoding step over a cache), a dtype ('bf16',
'fp16', 'fp32'), a head dim, a sequence length T (a decode bucket: the cache's length,
rounded by decode_t) and a number of sequences times heads BH, and a variant ('' or
'qsolve': a solve stage with its own queries; decode buckets have none). Tuned files key
their entries by Bucket.key, the tuner's --shapes files list buckets in the same YAML form
as a tuned entry (`pass`, `dtype`, `head_dim`, `T`, `BH`, optional `variant`), and the
dispatcher looks calls up by one.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

from ..errors import ConfigError
from ..kernels.config import SUPPORTED_HEAD_DIMS
from ..settings import DTYPE_NAMES

DECODE = "decode"  # a decoding step's pass: its entries hold decode knobs, not a KernelConfig
PASSES = ("fwd", "fwd+bwd", DECODE)
# The smallest T of a decode bucket: the smallest cache length the tuner tunes (the
# interpreter's bucket); a shorter cache looks up this one.
DECODE_MIN_T = 32
VARIANTS = ("", "qsolve")
FIELDS = ("pass", "dtype", "head_dim", "T", "BH")  # what the YAML form must give (variant optional)


class Bucket(NamedTuple):
    """A named tuple: the runtime builds one per call, and dictionaries key on it."""
    pass_: str  # 'fwd' or 'fwd+bwd' (`pass` in YAML)
    dtype: str
    head_dim: int
    T: int
    BH: int
    variant: str = ""

    @property
    def key(self) -> str:
        """'fwd/bf16/d128/t4096/bh16' (+ '/qsolve'): the tuned file's entry key."""
        return (f"{self.pass_}/{self.dtype}/d{self.head_dim}/t{self.T}/bh{self.BH}"
                + (f"/{self.variant}" if self.variant else ""))

    @property
    def backward(self) -> bool:
        return self.pass_ == "fwd+bwd"

    @property
    def decode(self) -> bool:
        return self.pass_ == DECODE

    def fields(self) -> dict[str, Any]:
        """The YAML form (a tuned entry's bucket fields)."""
        out = {"pass": self.pass_, "dtype": self.dtype, "head_dim": self.head_dim,
               "T": self.T, "BH": self.BH}
        if self.variant:
            out["variant"] = self.variant
        return out

    @classmethod
    def from_fields(cls, data: Mapping[str, Any], where: str) -> "Bucket":
        """The bucket of a YAML mapping (a tuned entry or a --shapes item); ConfigError
        naming `where` and the field if one is missing or wrong. Other keys are ignored."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a mapping with {', '.join(FIELDS)}, "
                              f"got {type(data).__name__}")
        missing = [f for f in FIELDS if f not in data]
        if missing:
            raise ConfigError(f"{where} lacks {missing}")
        if not isinstance(data["pass"], str) or data["pass"] not in PASSES:
            raise ConfigError(f"{where}: pass must be one of {', '.join(PASSES)}, got {data['pass']!r}")
        if data.get("variant", "") not in VARIANTS:
            raise ConfigError(f"{where}: variant must be qsolve or left out, got {data.get('variant')!r}")
        if data["pass"] == DECODE and data.get("variant", ""):
            raise ConfigError(f"{where}: a decode bucket has no variant, got {data['variant']!r}")
        if not isinstance(data["dtype"], str) or data["dtype"] not in DTYPE_NAMES:
            raise ConfigError(f"{where}: dtype must be one of {', '.join(DTYPE_NAMES)}, "
                              f"got {data['dtype']!r}")
        for name in ("head_dim", "T", "BH"):  # bool is an int: true is no T
            if type(data[name]) is not int or data[name] < 1:
                raise ConfigError(f"{where}: {name} must be an integer >= 1, got {data[name]!r}")
        if data["head_dim"] not in SUPPORTED_HEAD_DIMS:
            raise ConfigError(f"{where}: head_dim must be one of "
                              f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))}, got {data['head_dim']}")
        return cls(data["pass"], data["dtype"], data["head_dim"], data["T"], data["BH"],
                   data.get("variant", ""))

    @classmethod
    def from_key(cls, key: str) -> "Bucket":
        """The bucket of a key (the inverse of `key`: 'fwd/bf16/d128/t4096/bh16[/qsolve]',
        as tuned entries and tune studies name buckets); ConfigError if it is not one."""
        parts = key.split("/") if isinstance(key, str) else []
        try:
            pass_, dtype, d, t, bh, *rest = parts
            if d[:1] != "d" or t[:1] != "t" or bh[:2] != "bh" or len(rest) > 1:
                raise ValueError
            fields = {"pass": pass_, "dtype": dtype, "head_dim": int(d[1:]), "T": int(t[1:]),
                      "BH": int(bh[2:]), **({"variant": rest[0]} if rest else {})}
        except ValueError:
            raise ConfigError(f"bucket key {key!r}: expected pass/dtype/d<head dim>/t<T>/bh<BH>"
                              "[/qsolve], e.g. fwd/bf16/d128/t4096/bh16") from None
        return cls.from_fields(fields, f"bucket key {key!r}")


def decode_t(cache_length: int) -> int:
    """The T of the decode bucket of a cache holding `cache_length` tokens: the length
    rounded up to a power of two, at least DECODE_MIN_T. A decoding loop grows its cache by
    a token a step; rounding makes it meet a new bucket only at each doubling, so its
    lookups stay memoized (and a tuned entry, within REACH, serves about the same range)."""
    return max(DECODE_MIN_T, 1 << (max(cache_length, 1) - 1).bit_length())
