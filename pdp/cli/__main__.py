import sys

from pdp.cli.main import main

sys.exit(main())
