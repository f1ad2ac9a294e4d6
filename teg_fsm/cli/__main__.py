"""``python -m teg_fsm.cli``: the ``teg`` command from a checkout."""

import sys

from teg_fsm.cli.main import main

sys.exit(main())
