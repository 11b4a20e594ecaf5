"""``python -m braintumor.serving.app``: the web app (see ``cli``)."""

import sys

from braintumor.serving.app.memory import limit_malloc_arenas

# Before the imports below start threads (numpy's, then the model's and the server's).
limit_malloc_arenas()

from braintumor.serving.app.cli import main  # noqa: E402

sys.exit(main())
