"""``python -m anyflow.cli`` (the same as the ``anyflow`` script)."""

from anyflow.cli import main

raise SystemExit(main())
