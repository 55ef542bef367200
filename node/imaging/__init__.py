"""dicom-node's imaging library: modality rescale, windowing, equalisation, display helpers.

Pure array functions, usable from a notebook::

    import pydicom
    from node.imaging import to_hu, window, WINDOWS, freqhist_bins, hist_scaled

    ds = pydicom.dcmread("ct.dcm")
    hu = to_hu(ds)
    brain = window(hu, WINDOWS["brain"].center, WINDOWS["brain"].width)
    equalised = hist_scaled(hu, freqhist_bins(hu))
    coloured = apply_colormap(quantise(brain, 8), colormap_table("bone"))
"""

from node.imaging.colormap import apply_colormap, colormap_table
from node.imaging.display import clip, floor_levels, invert, output_levels, quantise, stack_channels, to_grey
from node.imaging.equalise import FrequencyHistogram, freqhist_bins, hist_scaled
from node.imaging.modality import rescale_frame, to_hu
from node.imaging.source import ImageFile, UnsupportedImage
from node.imaging.voi import (
    WINDOWS,
    VOIFunction,
    Window,
    apply_voi_lut_sequence,
    file_window,
    window,
    window_scaled,
)

__all__ = [
    "WINDOWS",
    "FrequencyHistogram",
    "ImageFile",
    "UnsupportedImage",
    "VOIFunction",
    "Window",
    "apply_colormap",
    "apply_voi_lut_sequence",
    "clip",
    "colormap_table",
    "file_window",
    "floor_levels",
    "freqhist_bins",
    "hist_scaled",
    "invert",
    "output_levels",
    "quantise",
    "rescale_frame",
    "stack_channels",
    "to_grey",
    "to_hu",
    "window",
    "window_scaled",
]
