"""`python -m verify ...`; see verify/cli.py. The guard matters: spawned ranks import this
module as __mp_main__ and must not run the CLI again."""
import sys

from verify.cli import main

if __name__ == "__main__":
    sys.exit(main())
