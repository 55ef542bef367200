"""Test helpers in one place, for the tests and for ``scripts/bench``: ``from tests.support import NAME``.

Every peer, process and server started by a helper talks to 127.0.0.1 only and is stopped by its
``with`` block (or fixture), also when the test fails.

* :mod:`~tests.support.tools` - the checkout (:data:`ROOT`), pydicom's bundled files, external tools,
  ``dicom-node`` as a command (:func:`run_cli`).
* :mod:`~tests.support.peers` - real peers: Orthanc, dcmtk's storescu/echoscu/storescp, an HTTPS front,
  free ports, the shared real data (``$DICOM_NODE_TEST_DATA``).
* :mod:`~tests.support.postgres` - a real PostgreSQL server in a temporary folder.
* :mod:`~tests.support.config` - node configs: the TOML tables the tests repeat (:func:`node_config`,
  :func:`folder_route`, :func:`pipeline`, :func:`route`, ...), and configs whose errors name a line.
* :mod:`~tests.support.node_process` - ``dicom-node serve`` as a real process; series made from real files;
  ``wait_for``.
* :mod:`~tests.support.pki` - two test CAs and their certificates, made with ``openssl``.
* :mod:`~tests.support.big_images`, :mod:`~tests.support.hostile`, :mod:`~tests.support.process_memory` -
  huge and hostile inputs, clients that never become associations, peak memory of a process (tree).

The harnesses of one area are imported from their module (their names are only clear there):

* :mod:`tests.support.status_rows` - a job store filled as the service fills it, for the status server.
* :mod:`tests.support.archive` - a DICOMweb archive (Orthanc) for the poller and backfill, and its fixtures.
* :mod:`tests.support.render_cases` - the pipelines and files every renderer path must render alike.
* :mod:`tests.support.in_process_scp` - the node's C-STORE handler on a pynetdicom SCP in the test's process.
* :mod:`tests.support.volume_series` - CT series for the volume outputs, and what a volume's slices say.
"""

from __future__ import annotations

# In dependency order: each module imports only the ones above it.
from tests.support.tools import (
    ROOT, bundled, chromium_screenshot, dciodvfy_errors, env_without_config, node_env, run_cli, tool,
)
from tests.support.peers import (
    LOCALHOST, REJECTED_SOP_CLASS_STATUS, STORESCU_BIN, TEST_DATA_ENV, OrthancError, OrthancServer, StoreSCP, TlsFront,
    echoscu, free_port, kill_group, nodelay_env, orthanc_fixture, require_test_data, running_orthanc, store_responses,
    stop_process_group, storescu, test_data_dir,
)
from tests.support.postgres import PostgresServer, postgres_bin, running_postgres
from tests.support.config import (
    BRAIN, HEAD, NO_SUCH_HOST, RESCALE, dicom_destination, dicomweb_destination, dicomweb_source, discard_route,
    dry_run_config, error_of, folder_destination, folder_route, load_text, marked_line, node_config, pipeline, route,
    table, toml, write_config,
)
from tests.support.node_process import NodeProcess, copy_as_series, wait_for
from tests.support.pki import Pki, openssl
from tests.support.big_images import COLUMNS, ROWS, pixel_data_span, same_bytes, write_cine, write_rle_ct
from tests.support.hostile import GARBAGE, Drop, HeldConnections, held
from tests.support.process_memory import TreePeakMemory, peak_rss, process_tree, tree_hwm

__all__ = [
    "BRAIN", "COLUMNS", "GARBAGE", "HEAD", "LOCALHOST", "NO_SUCH_HOST", "REJECTED_SOP_CLASS_STATUS", "RESCALE", "ROOT",
    "ROWS", "STORESCU_BIN", "TEST_DATA_ENV", "Drop", "HeldConnections", "NodeProcess", "OrthancError", "OrthancServer",
    "Pki", "PostgresServer", "StoreSCP", "TlsFront", "TreePeakMemory", "bundled", "chromium_screenshot",
    "copy_as_series", "dciodvfy_errors", "dicom_destination", "dicomweb_destination", "dicomweb_source",
    "discard_route", "dry_run_config", "echoscu", "env_without_config", "error_of", "folder_destination",
    "folder_route", "free_port", "held", "kill_group", "load_text", "marked_line", "node_config", "node_env",
    "nodelay_env", "openssl", "orthanc_fixture", "peak_rss", "pipeline", "pixel_data_span", "postgres_bin",
    "process_tree", "require_test_data", "route", "run_cli", "running_orthanc", "running_postgres", "same_bytes",
    "stop_process_group", "store_responses", "storescu", "table", "test_data_dir", "toml", "tool", "tree_hwm",
    "wait_for", "write_cine", "write_config", "write_rle_ct",
]
