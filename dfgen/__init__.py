"""dfgen: generated and tuned Triton kernels for DeltaFormer attention.

Models import dfgen.runtime; dfgen.naive holds the reference; the CLI is `dfgen`.
Importing dfgen compiles, tunes and creates nothing.
"""

__version__ = "0.1.0"
