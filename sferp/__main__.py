"""`python -m sferp`: the same as the `sferp` console script."""

from sferp.cli import main

main()
