"""The kernels: what each template declares (spec.py), building a specialization (build.py:
render, cache, import), configs and the built-in defaults (config.py), and the host side
of each stage's launch (forward.py, backward.py, padding.py). The templates themselves
are templates/*.py.jinja (installed as dfgen._templates). Imports nothing above it."""
