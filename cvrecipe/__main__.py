import os
import sys

from cvrecipe.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A rank of a data-parallel job ends here, its process group destroyed and its files closed. Skip
    # the interpreter's teardown: native threads left by Gloo's transport can abort it ("terminate
    # called without an active exception", SIGABRT), which the launcher would report as a failed rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
