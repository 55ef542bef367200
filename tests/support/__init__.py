"""Test helpers in one place, for the tests and for ``scripts/bench``: ``from tests.support import NAME``.

Every peer, process and server started by a helper talks to 127.0.0.1 only and is stopped by its
``with`` block (or fixture), also when the test fails.

* :mod:`~tests.support.tools` - the checkout (:data:`ROOT`), pydicom's bundled files, external tools,
  ``dicom-node`` as a command (:func:`run_cli`).
* :mod:`~tests.support.peers` - real peers: Orthanc, dcmtk's storescu/echoscu/storescp, an HTTPS front,
  free ports, the shared real data (``$DICOM_NODE_TEST_DATA``).
* :mod:`~tests.support.postgres` - a real PostgreSQL server in a temporary folder.
* :mod:`~tests.support.node_process` - ``dicom-node serve`` as a real process; series made from real files;
  ``wait_for``.
* :mod:`~tests.support.big_images`, :mod:`~tests.support.hostile`, :mod:`~tests.support.process_memory` -
  huge and hostile inputs, clients that never become associations, peak memory of a process tree.
"""

from __future__ import annotations

from tests.support.tools import ROOT, bundled, dciodvfy_errors, node_env, run_cli, tool  # noqa: I001 - in dependency order
from tests.support.peers import (
    LOCALHOST, REJECTED_SOP_CLASS_STATUS, STORESCU_BIN, TEST_DATA_ENV, OrthancError, OrthancServer, StoreSCP, TlsFront,
    echoscu, free_port, kill_group, nodelay_env, orthanc_fixture, require_test_data, running_orthanc, store_responses,
    storescu, test_data_dir,
)
from tests.support.postgres import PostgresServer, postgres_bin, running_postgres
from tests.support.node_process import NodeProcess, copy_as_series, folder_route, node_config, wait_for
from tests.support.big_images import write_rle_ct
from tests.support.hostile import GARBAGE, Drop, HeldConnections, held
from tests.support.process_memory import TreePeakMemory, process_tree, tree_hwm

__all__ = [
    "GARBAGE", "LOCALHOST", "REJECTED_SOP_CLASS_STATUS", "ROOT", "STORESCU_BIN", "TEST_DATA_ENV", "Drop",
    "HeldConnections", "NodeProcess", "OrthancError", "OrthancServer", "PostgresServer", "StoreSCP", "TlsFront",
    "TreePeakMemory", "bundled", "copy_as_series", "dciodvfy_errors", "echoscu", "folder_route", "free_port", "held",
    "kill_group", "node_config", "node_env", "nodelay_env", "orthanc_fixture", "postgres_bin", "process_tree",
    "require_test_data", "run_cli", "running_orthanc", "running_postgres", "store_responses", "storescu",
    "test_data_dir", "tool", "tree_hwm", "wait_for", "write_rle_ct",
]
