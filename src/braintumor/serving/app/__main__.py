"""``python -m braintumor.serving.app``: the web app (see ``cli``)."""

import sys

from braintumor.serving.app.cli import main

sys.exit(main())
