"""What the CLI's arguments name, parsed and checked: shapes, config files, knob settings.
Each defect is a one-line error naming the flag."""

from __future__ import annotations

from ..errors import ConfigError, InputError
from ..files import read_yaml
from ..kernels.config import SUPPORTED_HEAD_DIMS, KernelConfig

CPU_SHAPES = [(1, 64, 2, 32), (2, 48, 1, 32)]  # the benchmark's shapes without a GPU


def parse_shapes(text: str) -> list[tuple]:
    """'B,T,H,D;B,T,H,D;...' as a list of (B, T, H, D); InputError naming --shapes unless
    each is four positive integers with a supported head dim."""
    shapes = []
    for item in text.split(";"):
        try:
            shape = tuple(int(x) for x in item.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 4 or min(shape) < 1:
            raise InputError(f"--shapes expects 'B,T,H,D;B,T,H,D;...' of positive integers, "
                             f"got {item!r} in {text!r}")
        if shape[3] not in SUPPORTED_HEAD_DIMS:
            raise InputError(f"--shapes {item}: head dim {shape[3]} is not supported; expected "
                             f"one of {', '.join(map(str, SUPPORTED_HEAD_DIMS))}")
        shapes.append(shape)
    return shapes


# Without a GPU the kernels run in Triton's interpreter: about a second for the CPU shapes
# and growing with B * H * T * T * D, so a GPU-sized shape would run for hours. Shapes
# whose work is above this bound (twice the largest CPU shape's) are refused unless forced.
CPU_MAX_WORK = 2 * max(B * H * T * T * D for B, T, H, D in CPU_SHAPES)


def check_cpu_sizes(shapes) -> None:
    """InputError naming the first shape too large for the interpreter, the bound and --force."""
    for B, T, H, D in shapes:
        if B * H * T * T * D > CPU_MAX_WORK:
            raise InputError(
                f"--shapes {B},{T},{H},{D}: no CUDA device, and B*H*T*T*D = {B * H * T * T * D} "
                f"exceeds the interpreter's limit {CPU_MAX_WORK} (it would run for a very long "
                "time); use shapes like 1,64,2,32, or --force to run it anyway")


def load_configs(path) -> list[KernelConfig]:
    """A YAML file holding one config or a list of them (sections a config lacks stay
    empty; callers fill them from a default). ConfigError naming the file if it cannot
    be read or holds no configs."""
    data = read_yaml(path)
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(item, dict) for item in items):
        raise ConfigError(f"{path} must hold a config mapping or a list of them")
    try:
        return [KernelConfig.from_dict(item) for item in items]
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def parse_value(text: str):
    if text.lower() in ("true", "false"):  # bool knobs (INV_FP16=true)
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_sets(pairs) -> dict:
    out = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise InputError(f"--set expects NAME=VALUE, got {pair!r}")
        name, value = pair.split("=", 1)
        out[name.strip()] = parse_value(value.strip())
    return out
