"""``python -m node``: the ``dicom-node`` command (:func:`node.app.cli.main`)."""

import sys

from node.app.cli import main

if __name__ == "__main__":  # not when multiprocessing's spawn imports this as __mp_main__
    sys.exit(main())
