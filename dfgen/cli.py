"""The `dfgen` command. Each subcommand is a small function returning an exit code;
heavy modules are imported inside them, so `dfgen --help` stays fast."""

from __future__ import annotations

import argparse
import os
import sys


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_sets(pairs) -> dict:
    out = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise SystemExit(f"dfgen: --set expects NAME=VALUE, got {pair!r}")
        name, value = pair.split("=", 1)
        out[name.strip()] = _parse_value(value.strip())
    return out


def _use_interpreter_without_gpu() -> bool:
    """Without a CUDA device, run kernels in Triton's interpreter. Returns True if so."""
    import torch

    if torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def cmd_emit(args) -> int:
    import torch  # noqa: F401  (dtype names)

    from .codegen import emit
    from .config import default_config
    from .templating import spec

    head_dim = args.head_dim
    defaults = default_config(head_dim)
    base = dict(defaults.solve if args.stage == "solve_fwd" else defaults.attn)
    knobs = {**base, **_parse_sets(args.set)}
    spec(args.stage).check(knobs, head_dim)
    path, text = emit(args.stage, args.dtype, head_dim, knobs)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text)
        print(f"wrote {args.out} (cached as {path})", file=sys.stderr)
    else:
        sys.stdout.write(text)
        print(f"# cached as {path}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    interpreted = _use_interpreter_without_gpu()
    import torch

    from .bench import load_configs, run

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    shapes = None
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    configs = load_configs(args.configs) if args.configs else None
    if interpreted:
        print("dfgen bench: no CUDA device; running in Triton's interpreter at a tiny size "
              "(timings are NOT GPU timings)", flush=True)
    print(run(shapes, dtype, configs, with_fla=not args.no_fla, verbose=args.verbose,
              backward=args.backward))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfgen", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    emit = sub.add_parser("emit", help="print (or write) the generated Triton source of a stage")
    emit.add_argument("--stage", choices=["solve_fwd", "attn_fwd"], default="solve_fwd")
    emit.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    emit.add_argument("--head-dim", type=int, default=128)
    emit.add_argument("--set", action="append", metavar="KNOB=VALUE",
                      help="override a knob of the default config (repeatable)")
    emit.add_argument("--out", help="write the source to this file instead of stdout")
    emit.set_defaults(func=cmd_emit)

    bench = sub.add_parser("bench", help="benchmark against torch SDPA and fla")
    bench.add_argument("--shapes", help="'B,T,H,D;B,T,H,D;...' (default: the standard set)")
    bench.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    bench.add_argument("--configs", help="YAML file with a forward config or a list of them; "
                       "each is checked against the reference, the fastest is reported "
                       "(default: the built-in config)")
    bench.add_argument("--verbose", action="store_true", help="print every candidate's time")
    bench.add_argument("--backward", action="store_true",
                       help="time forward+backward (and report peak memory) instead of forward")
    bench.add_argument("--no-fla", action="store_true", help="skip fla's column")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import DfgenError

    try:
        return args.func(args)
    except DfgenError as err:
        print(f"dfgen {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
