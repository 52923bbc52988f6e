import sys

from edgecore.cli import main

sys.exit(main())
