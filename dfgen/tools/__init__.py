"""The `dfgen` command and what only it uses: the CLI (cli.py), reference checks
(check.py), timing (timing.py), the benchmark table (bench.py), argument files
(arguments.py) and the tuner (tuning/). Nothing below imports these."""
