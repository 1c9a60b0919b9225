"""``python -m stlm`` = the ``stlm`` command."""

from stlm.cli import main

main()
