import sys

from mlxterp_core.cli import main

sys.exit(main())
