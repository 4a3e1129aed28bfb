"""python -m hwtool (also the entry point for torchrun -m hwtool)."""

from hwtool.cli import main

main()
