import sys

from lightning_gc.cli import main

sys.exit(main())
