"""Harness commands run one after another in one process: `python tests/torchrun_harnesses.py JSON`, JSON a list of
[script name, [arguments], expected exit code]. Under torchrun every rank runs them all in one process group
(tests/test_distributed.py starts the interpreter, torch and the ranks once for all three harnesses). Exits with 1
at the first command that ends with another code."""
import json
import sys

from helpers_inputs import script

for name, argv, expected in json.loads(sys.argv[1]):
    code = script(name).main(argv)
    if code != expected:
        sys.exit(f"{name} {argv}: exit code {code}, expected {expected}")
