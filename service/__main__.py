"""``python -m service ...``: the same entry point as the ``seqserve`` command."""

import sys

from service.cli.main import main

sys.exit(main())
