"""``python -m dcmrecvd``: the same entry point as the console script."""

from dcmrecvd.cli import main

raise SystemExit(main())
