"""`python -m atropos.sandbox.server`: the same as `atropos-sandbox server`."""

import sys

from atropos.sandbox.server.main import main

sys.exit(main())
