"""Derived Secondary Capture (SC) output.

dicom-node turns source images (e.g. a CT series) into windowed or equalised
8/16-bit grey or 8-bit RGB frames and stores them as *derived* Secondary
Capture instances in the source's study, in a new series.

Why not highdicom's ``SCImage`` itself: highdicom 0.28 writes single-frame Secondary Capture only
(a 3-D array is taken as colour, so the Multi-frame Grayscale Byte/Word SC IODs cannot be made
with it), it holds the whole pixel array in memory to build Pixel Data (a 1,000-frame cine would
be held decoded), and dciodvfy reported an error in its output from a CT slice (Laterality, type
2C, copied from a source where it does not apply).  This package streams frames into the file.

* :class:`DerivedImage` describes one new instance (its frames, UID, number and sources),
  :class:`DerivedSeries` the new series, :class:`SourceImage` a source instance; each checks
  itself when made (:mod:`~node.outputs.sc.model`).
* :func:`secondary_capture_header` builds the whole data set except Pixel Data
  (with its File Meta Information, Explicit VR Little Endian): :mod:`~node.outputs.sc.header`,
  from the source's attributes as :mod:`~node.outputs.sc.attributes` says.
* :func:`write_secondary_capture` writes that header and streams the frames
  into the Pixel Data element one frame at a time (:mod:`~node.outputs.sc.pixels`), then moves
  the finished file onto its path atomically.
* :class:`SecondaryCaptureSeriesWriter` writes the instances of one derived
  series with the same bytes as those two, but encodes the header they share
  once and only its per-instance elements for each instance (:mod:`~node.outputs.sc.template`).

SOP classes written:

============  ================  ===============================================
grey/colour   bits allocated    SOP Class
============  ================  ===============================================
single frame  8 or 16 grey,     Secondary Capture Image Storage
              8 RGB             (1.2.840.10008.5.1.4.1.1.7)
multi-frame   8 grey            Multi-frame Grayscale Byte SC Image Storage
                                (1.2.840.10008.5.1.4.1.1.7.2)
multi-frame   16 grey           Multi-frame Grayscale Word SC Image Storage
                                (1.2.840.10008.5.1.4.1.1.7.3)
multi-frame   8 RGB             Multi-frame True Color SC Image Storage
                                (1.2.840.10008.5.1.4.1.1.7.4)
============  ================  ===============================================

Grey is MONOCHROME2 (unsigned, all allocated bits stored); colour is RGB with
Planar Configuration 0 (``R G B R G B ...``).
"""

from node.outputs.sc import model as _model
from node.outputs.sc.attributes import derived_burned_in_annotation
from node.outputs.sc.header import secondary_capture_header
from node.outputs.sc.model import (
    MULTIFRAME_GRAYSCALE_BYTE_SC_IMAGE_STORAGE,
    MULTIFRAME_GRAYSCALE_WORD_SC_IMAGE_STORAGE,
    MULTIFRAME_TRUE_COLOR_SC_IMAGE_STORAGE,
    SECONDARY_CAPTURE_IMAGE_STORAGE,
    DerivedImage,
    DerivedSeries,
    SourceImage,
)
from node.outputs.sc.writer import SecondaryCaptureSeriesWriter, write_secondary_capture

__all__ = [
    *_model.__all__,  # the SOP classes and the three descriptions
    "SecondaryCaptureSeriesWriter",
    "derived_burned_in_annotation",
    "secondary_capture_header",
    "write_secondary_capture",
]
