"""What a pipeline does, as data: parsed once from the config file or the command line.

A pipeline is a fixed order of stages, each optional::

    grey -> rescale (Modality LUT) -> clip -> display (window | equalise | channels) -> colormap -> output

The config file lists steps (``[{ op = "rescale" }, { op = "window", preset = "brain" }]``); they
are checked here and turned into a :class:`Pipeline`, with errors that name the step.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from node.imaging.colormap import UnknownColormap, check_colormap
from node.imaging.voi import WINDOWS, VOIFunction, Window, as_voi_function

__all__ = [
    "Channels",
    "Clip",
    "Equalise",
    "GSPS_CANNOT",
    "OutputFormat",
    "Pipeline",
    "PipelineError",
    "WindowSpec",
    "parse_steps",
    "parse_window",
    "series_description",
]


class PipelineError(ValueError):
    """A pipeline definition that cannot work; the message names the step and the value.

    ``step`` (0-based) and ``key`` say which key of which step is at fault when that is known
    (a config check then points at its line); None otherwise.
    """

    def __init__(self, message: str, *, step: int | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.key = key


class OutputFormat(str, Enum):
    """What a pipeline writes: Secondary Capture (8/16-bit), PNG (8/16-bit), a Grayscale Softcopy
    Presentation State (``gsps``: the display instructions, referencing the sources), or a volume per
    series (NIfTI ``.nii.gz`` or NumPy ``.npz``, :mod:`node.outputs.volume`)."""

    SC = "sc"
    SC16 = "sc16"
    PNG = "png"
    PNG16 = "png16"
    GSPS = "gsps"
    NIFTI = "nifti"
    NPZ = "npz"

    @property
    def bits(self) -> int:
        """Bits per grey sample (colour output is always 8)."""
        return 16 if self in (OutputFormat.SC16, OutputFormat.PNG16) else 8

    @property
    def is_dicom(self) -> bool:
        """Whether the output is DICOM (a Secondary Capture or a presentation state)."""
        return self in (OutputFormat.SC, OutputFormat.SC16, OutputFormat.GSPS)

    @property
    def is_volume(self) -> bool:
        """Whether the output is one volume file per series (or per stack) with a JSON sidecar."""
        return self in (OutputFormat.NIFTI, OutputFormat.NPZ)


#: Steps a Grayscale Softcopy Presentation State cannot express, and why (``output = "gsps"``).
GSPS_CANNOT: dict[str, str] = {
    "grey": "output gsps displays the source images themselves, and a Grayscale Softcopy Presentation "
    "State applies to grey images only: converting colour to grey needs output sc or png",
    "channels": "channels make an RGB image, and a Grayscale Softcopy Presentation State shows each "
    "source image in grey: use output sc or png",
    "colormap": "a colour map makes a colour image, and a Grayscale Softcopy Presentation State shows "
    "each source image in grey (no Pseudo-Color Presentation State is written): use output sc or png",
}


@dataclass(frozen=True)
class WindowSpec:
    """Where a window comes from: a named preset, explicit centre/width, or the file itself.

    ``from_file`` uses the file's VOI LUT Sequence if it has one, else its Window Center/Width
    value number ``index`` (pydicom's ``prefer_lut`` order).
    """

    window: Window | None = None
    name: str | None = None
    from_file: bool = False
    index: int = 0

    def describe(self) -> str:
        """Text for DerivationDescription and logs."""
        if self.from_file:
            return f"file window {self.index + 1}" if self.index else "file window"
        assert self.window is not None
        label = f"{self.name} " if self.name else ""
        return f"{label}{self.window.describe()}"


@dataclass(frozen=True)
class Clip:
    """Clamp modality values to ``[min, max]`` before display (fastai's ``min_px``/``max_px``)."""

    min: float | None = None
    max: float | None = None

    def describe(self) -> str:
        """Text for DerivationDescription and logs."""
        return f"clip [{_fmt(self.min)}, {_fmt(self.max)}]"


@dataclass(frozen=True)
class Equalise:
    """Histogram equalisation with fastai's ``freqhist_bins``/``hist_scaled``."""

    bins: int = 100
    per: str = "image"  # "image" or "series": one set of bins for the whole series

    def describe(self) -> str:
        """Text for DerivationDescription and logs."""
        return f"equalise {self.bins} bins per {self.per}"


@dataclass(frozen=True)
class Channels:
    """Several windows (and optionally the equalised image) as the R, G, B channels."""

    windows: tuple[WindowSpec, ...]
    equalise: Equalise | None = None

    def describe(self) -> str:
        """Text for DerivationDescription and logs."""
        parts = [w.describe() for w in self.windows]
        if self.equalise:
            parts.append(self.equalise.describe())
        return "channels RGB = " + " | ".join(parts)


Display = WindowSpec | Equalise | Channels


@dataclass(frozen=True)
class Pipeline:
    """A checked pipeline definition."""

    name: str
    output: OutputFormat = OutputFormat.SC
    grey: bool = False
    rescale: bool = True
    clip: Clip | None = None
    display: Display | None = None
    colormap: str | None = None  # a matplotlib colour map name: 8-bit grey -> RGB
    steps: tuple[Mapping[str, Any], ...] = field(default=(), compare=False, repr=False)
    #: Volume outputs only: write the patient's name and ID into the JSON sidecar (default: never).
    keep_patient: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.display, Channels) and self.output.bits == 16:
            raise PipelineError(
                f"pipeline {self.name!r}: channels make RGB, which is 8-bit only; use output sc or png"
            )
        if self.output is OutputFormat.GSPS:
            for step, present in (("grey", self.grey), ("channels", isinstance(self.display, Channels)),
                                  ("colormap", self.colormap is not None)):
                if present:
                    raise PipelineError(f"pipeline {self.name!r}: {step}: {GSPS_CANNOT[step]}")
        if self.colormap is not None and isinstance(self.display, Channels):
            raise PipelineError(
                f"pipeline {self.name!r}: a colour map colours one grey image; channels are already RGB"
            )
        if self.colormap is not None and self.output.is_volume:
            raise PipelineError(
                f"pipeline {self.name!r}: a colour map makes RGB pictures to look at, and volume outputs "
                "(nifti, npz) keep values: use output sc or png"
            )
        if self.colormap is not None and self.output.bits == 16:
            raise PipelineError(
                f"pipeline {self.name!r}: a colour map makes RGB, which is 8-bit only; use output sc or png"
            )
        if self.keep_patient and not self.output.is_volume:
            raise PipelineError(f"pipeline {self.name!r}: keep_patient is for volume outputs (nifti, npz); "
                                f"output {self.output.value} keeps what its format keeps")

    @property
    def equalise(self) -> Equalise | None:
        """The equalisation step, alone or as a channel."""
        if isinstance(self.display, Equalise):
            return self.display
        if isinstance(self.display, Channels):
            return self.display.equalise
        return None

    def describe(self) -> str:
        """What was done, for DerivationDescription (0008,2111): e.g. ``rescale; brain window ...``."""
        parts = []
        if self.grey:
            parts.append("colour to grey")
        if self.rescale:
            parts.append("modality rescale")
        if self.clip:
            parts.append(self.clip.describe())
        if self.display is not None:
            parts.append(self.display.describe())
        if self.colormap is not None:
            parts.append(f"colour map {self.colormap}")
        if self.output.is_volume and self.display is None:
            parts.append("modality values volume" if self.rescale else "stored values volume")
        elif self.output.is_volume:
            parts.append(f"{self.output.bits}-bit volume")
        elif self.output is not OutputFormat.GSPS:  # a presentation state has no pixels of its own
            parts.append(f"{self.output.bits}-bit")
        return "; ".join(parts)

    def fingerprint(self) -> str:
        """A short stable hash of what the pipeline does (not its name): part of derived UIDs."""
        text = f"{self.describe()}|{self.output.value}" + ("|keep_patient" if self.keep_patient else "")
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fmt(value: float | None) -> str:
    return "-inf" if value is None else f"{value:g}"


# Series Description (0008,103E) is LO: at most 64 characters, no backslash, one line.
_LO_MAX = 64


def _short_window(spec: WindowSpec) -> str:
    """``lungs W1500 L-600``, ``W80 L40``, ``W80 L40 SIGMOID``, ``file window 2``."""
    if spec.from_file:
        return f"file window {spec.index + 1}" if spec.index else "file window"
    assert spec.window is not None
    text = f"W{spec.window.width:g} L{spec.window.center:g}"
    if spec.window.function is not VOIFunction.LINEAR:
        text += f" {spec.window.function.value}"
    return f"{spec.name} {text}" if spec.name else text


def _short_equalise(equalise: Equalise) -> str:
    per = " per series" if equalise.per == "series" else ""
    return f"equalised {equalise.bins} bins{per}"


def _short_display(display: Display | None) -> str:
    if isinstance(display, WindowSpec):
        return _short_window(display)
    if isinstance(display, Equalise):
        return _short_equalise(display)
    if isinstance(display, Channels):
        # a preset by its name alone: three windows must fit one line
        parts = [spec.name if spec.name else _short_window(spec) for spec in display.windows]
        if display.equalise is not None:
            parts.append(_short_equalise(display.equalise))
        return "RGB " + "/".join(parts)
    return "default window"  # the file's own window, else the image's value range


def _lo_safe(text: str) -> str:
    """``text`` on one line without backslashes (LO's delimiter)."""
    return " ".join(text.replace("\\", "/").split())


def series_description(pipeline: Pipeline, source_description: str = "") -> str:
    """Series Description of the series ``pipeline`` derives: what was done, then ``[name]``.

    What was done is said by each step that changes what the image shows, in pipeline order:
    ``grey``; a clip as ``clip -1000..3000``; the display as ``lungs W1500 L-600`` (a preset),
    ``W80 L40`` (centre and width; the VOI function if not LINEAR), ``file window`` (``file
    window 2``), ``equalised 100 bins`` (``... per series``), ``RGB brain/subdural/W80 L40``
    (channels: a preset by its name alone) or ``default window`` (no display step); then
    ``16-bit`` for 16-bit output.
    The modality rescale is not named: it changes units, not what is shown (the full account is
    in Derivation Description, :meth:`Pipeline.describe`).

    The source's description comes first (``Thorax 1.0 B70f: lungs W1500 L-600 [ct-lung]``)
    when the whole fits in 64 characters (LO), and is left out when not. The `` [name]`` suffix
    is always kept, as the poller recognises the node's own series by it: when it does not fit
    with what was done, what was done is cut short.

    Parameters
    ----------
    pipeline : Pipeline
        The pipeline that derives the series.
    source_description : str, optional
        The source series' Series Description ("" if it has none).

    Returns
    -------
    str
        At most 64 characters, one line, no backslash.
    """
    parts = []
    if pipeline.grey:
        parts.append("grey")
    if pipeline.clip is not None:
        high = "inf" if pipeline.clip.max is None else f"{pipeline.clip.max:g}"
        parts.append(f"clip {_fmt(pipeline.clip.min)}..{high}")
    parts.append(_short_display(pipeline.display))
    if pipeline.colormap is not None:
        parts.append(pipeline.colormap)
    if pipeline.output.bits == 16:
        parts.append("16-bit")
    done = _lo_safe(", ".join(parts))
    suffix = f" [{_lo_safe(pipeline.name)}]"
    source = _lo_safe(source_description)
    whole = f"{source}: {done}{suffix}"
    if source and len(whole) <= _LO_MAX:
        return whole
    room = _LO_MAX - len(suffix)
    if room <= 0:
        return suffix[-_LO_MAX:].strip()
    return f"{done[:room].rstrip(' ,/|')}{suffix}"


def parse_window(text: str) -> WindowSpec:
    """A window as written on the command line: ``PRESET``, ``C,W`` or ``file`` (``file:2``).

    Raises
    ------
    PipelineError
        Unknown preset, or numbers that do not parse.
    """
    text = text.strip()
    if text.lower() == "file" or text.lower().startswith("file:"):
        index = text.partition(":")[2] or "1"
        if not index.isdigit() or int(index) < 1:
            raise PipelineError(f"window {text!r}: write file or file:N with N >= 1")
        return WindowSpec(from_file=True, index=int(index) - 1)
    if text.lower() in WINDOWS:
        return WindowSpec(window=WINDOWS[text.lower()], name=text.lower())
    center, sep, width = text.partition(",")
    if sep:
        return WindowSpec(window=_window(center, width, "LINEAR", f"window {text!r}"))
    raise PipelineError(
        f"window {text!r}: not a preset ({', '.join(WINDOWS)}), 'file', or CENTER,WIDTH"
    )


def _window(center: Any, width: Any, function: Any, where: str) -> Window:
    try:
        c, w = float(center), float(width)
    except (TypeError, ValueError):
        raise PipelineError(f"{where}: center and width must be numbers, got {center!r}, {width!r}") from None
    try:
        fn = as_voi_function(function)
    except ValueError as exc:
        raise PipelineError(f"{where}: {exc}") from None
    if not (math.isfinite(c) and math.isfinite(w)):
        raise PipelineError(f"{where}: center and width must be finite")
    if w < 1 if fn is VOIFunction.LINEAR else w <= 0:
        raise PipelineError(f"{where}: width {w:g} is too small for {fn.value}")
    return Window(c, w, fn)


def _window_from_mapping(step: Mapping[str, Any], where: str) -> WindowSpec:
    keys = set(step) - {"op"}
    if "preset" in step:
        name = str(step["preset"]).lower()
        if name not in WINDOWS:
            raise PipelineError(f"{where}: unknown preset {step['preset']!r}; known: {', '.join(WINDOWS)}")
        _no_extra(keys, {"preset"}, where)
        return WindowSpec(window=WINDOWS[name], name=name)
    if step.get("from") == "file":
        _no_extra(keys, {"from", "index"}, where)
        index = step.get("index", 0)
        if not isinstance(index, int) or index < 0:
            raise PipelineError(f"{where}: index must be a whole number >= 0, got {index!r}")
        return WindowSpec(from_file=True, index=index)
    if "center" in step and "width" in step:
        _no_extra(keys, {"center", "width", "function"}, where)
        return WindowSpec(window=_window(step["center"], step["width"], step.get("function", "LINEAR"), where))
    raise PipelineError(f"{where}: give preset = NAME, center + width, or from = \"file\"")


def _no_extra(keys: set[str], allowed: set[str], where: str) -> None:
    extra = keys - allowed
    if extra:
        raise PipelineError(f"{where}: unknown key(s) {', '.join(sorted(extra))}; allowed: {', '.join(sorted(allowed))}")


def _equalise_from_mapping(step: Mapping[str, Any], where: str) -> Equalise:
    _no_extra(set(step) - {"op"}, {"bins", "per"}, where)
    bins = step.get("bins", 100)
    per = step.get("per", "image")
    if not isinstance(bins, int) or isinstance(bins, bool) or not 1 <= bins <= 100_000:
        raise PipelineError(f"{where}: bins must be a whole number from 1 to 100000, got {bins!r}")
    if per not in ("image", "series"):
        raise PipelineError(f"{where}: per must be \"image\" or \"series\", got {per!r}")
    return Equalise(bins=bins, per=per)


def _clip_from_mapping(step: Mapping[str, Any], where: str) -> Clip:
    _no_extra(set(step) - {"op"}, {"min", "max"}, where)
    low, high = step.get("min"), step.get("max")
    for name, value in (("min", low), ("max", high)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise PipelineError(f"{where}: {name} must be a number, got {value!r}")
    if low is None and high is None:
        raise PipelineError(f"{where}: give min, max or both")
    if low is not None and high is not None and low >= high:
        raise PipelineError(f"{where}: min {low} must be below max {high}")
    return Clip(None if low is None else float(low), None if high is None else float(high))


def _colormap_from_mapping(step: Mapping[str, Any], where: str, number: int) -> str:
    _no_extra(set(step) - {"op"}, {"name"}, where)
    if "name" not in step:
        raise PipelineError(f"{where}: give name = a matplotlib colour map (bone, ocean_r, viridis ...)",
                            step=number - 1, key="op")
    try:
        return check_colormap(step["name"])
    except UnknownColormap as exc:
        raise PipelineError(f"{where}: {exc}", step=number - 1, key="name") from None


def _channels_from_mapping(step: Mapping[str, Any], where: str) -> Channels:
    _no_extra(set(step) - {"op"}, {"windows", "equalise"}, where)
    windows = step.get("windows")
    if not isinstance(windows, Sequence) or isinstance(windows, str) or not windows:
        raise PipelineError(f"{where}: windows must be a list of presets, \"C,W\" or tables")
    specs = tuple(
        parse_window(w) if isinstance(w, str) else _window_from_mapping(w, f"{where} window {i + 1}")
        for i, w in enumerate(windows)
    )
    eq = step.get("equalise")
    equalise = None
    if eq:
        equalise = _equalise_from_mapping(eq if isinstance(eq, Mapping) else {}, f"{where} equalise")
    if not 1 <= len(specs) + (equalise is not None) <= 3:
        raise PipelineError(f"{where}: 1 to 3 channels (RGB), got {len(specs) + (equalise is not None)}")
    return Channels(specs, equalise)


def parse_steps(name: str, steps: Sequence[Mapping[str, Any]], output: str = "sc") -> Pipeline:
    """Check a list of steps from the config file and build the :class:`Pipeline`.

    Parameters
    ----------
    name : str
        The pipeline's name, used in messages.
    steps : sequence of mappings
        ``{op = "grey" | "rescale" | "clip" | "window" | "equalise" | "channels" | "colormap", ...}``.
    output : str
        ``sc``, ``sc16``, ``png``, ``png16``, ``gsps`` (which refuses the steps of
        :data:`GSPS_CANNOT`), ``nifti`` or ``npz``.

    Raises
    ------
    PipelineError
        The message names the pipeline, the step number and the key at fault.
    """
    try:
        fmt = OutputFormat(output)
    except ValueError:
        raise PipelineError(
            f"pipeline {name!r}: output {output!r} is not one of {', '.join(f.value for f in OutputFormat)}"
        ) from None
    found: dict[str, Any] = {"grey": False, "rescale": False, "clip": None, "display": None, "colormap": None}
    order = ["grey", "rescale", "clip", "display", "colormap"]
    last = -1
    for number, step in enumerate(steps, start=1):
        where = f"pipeline {name!r} step {number}"
        if not isinstance(step, Mapping) or "op" not in step:
            raise PipelineError(f"{where}: a step is a table with an op key, got {step!r}")
        op = step["op"]
        if fmt is OutputFormat.GSPS and op in GSPS_CANNOT:
            raise PipelineError(f"{where}: {op}: {GSPS_CANNOT[op]}")
        if op in ("grey", "rescale"):
            _no_extra(set(step) - {"op"}, set(), where)
            slot, value = op, True
        elif op == "clip":
            slot, value = "clip", _clip_from_mapping(step, where)
        elif op == "window":
            slot, value = "display", _window_from_mapping(step, where)
        elif op == "equalise":
            slot, value = "display", _equalise_from_mapping(step, where)
        elif op == "channels":
            slot, value = "display", _channels_from_mapping(step, where)
        elif op == "colormap":
            slot, value = "colormap", _colormap_from_mapping(step, where, number)
        else:
            raise PipelineError(
                f"{where}: unknown op {op!r}; known: grey, rescale, clip, window, equalise, channels, colormap"
            )
        position = order.index(slot)
        if found[slot] not in (None, False):
            raise PipelineError(f"{where}: only one {slot if slot != 'display' else 'window/equalise/channels'} step")
        if position < last:
            raise PipelineError(f"{where}: {op} must come before {order[last]}; order is {' -> '.join(order)}")
        found[slot], last = value, position
    return Pipeline(name=name, output=fmt, steps=tuple(steps), **found)
