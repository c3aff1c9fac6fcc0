"""`dfgen tune`: Optuna searches kernel configs per shape bucket, gated on correctness.

Only the CLI imports this package; the runtime never does (it imports no optuna).
"""
