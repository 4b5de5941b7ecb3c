"""``python -m tools.testbed ...``: the testbed commands (tools.testbed.cli), with the errors of `moe-compress`."""

from tools.testbed.cli import main

main()
