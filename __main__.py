"""`python -m evoforge ...` is the `evoforge` command."""
import sys

from evoforge.flows.cli import main

sys.exit(main())
