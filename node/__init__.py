"""dicom-node: a DICOM processing node.

Data flows one way: ingest -> spool -> series assembly -> pipeline -> writers -> senders.
The imaging library (:mod:`node.imaging`) and the writers (:mod:`node.outputs`) can be used on their own.
"""

__version__ = "0.1.0"

#: The Manufacturer (and model name) of everything this node writes; the poller skips series carrying it.
MANUFACTURER = "dicom-node"

#: The software that wrote an output, as outputs name it (PNG text, volume sidecars).
SOFTWARE = f"{MANUFACTURER} {__version__}"
