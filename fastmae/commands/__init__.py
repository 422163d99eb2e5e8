"""One module per subcommand: its config dataclasses (the flags and their rules) beside its `run_*`. Commands never
import each other; `fastmae/cli.py` dispatches to them.
"""
