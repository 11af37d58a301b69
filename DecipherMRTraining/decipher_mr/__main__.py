import sys

from decipher_mr.cli import main

sys.exit(main())
