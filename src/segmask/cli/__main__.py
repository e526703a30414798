import sys

from segmask.cli import main

sys.exit(main())
