import sys

from healnet.cli import main

sys.exit(main())
