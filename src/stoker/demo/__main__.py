"""``python -m stoker.demo``: the same as ``stoker demo``."""

from stoker.demo.command import main

raise SystemExit(main())
