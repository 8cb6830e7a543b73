import sys

from cvrecipe.cli import main

sys.exit(main())
