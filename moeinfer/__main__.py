import sys

from moeinfer.cli import main

sys.exit(main())
