"""`python -m evoforge ...` is the `evoforge` command."""
import sys

from evoforge.app.cli import main

sys.exit(main())
