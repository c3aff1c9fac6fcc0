"""Which config serves a call: the Bucket of a call (bucket.py), the GPU's identity
(gpu.py), the tuned-file format (tuned_file.py) and the dispatcher (dispatch.py).
Imports kernels only; never runs the reference."""
