import sys

from spiq.cli import main

sys.exit(main())
