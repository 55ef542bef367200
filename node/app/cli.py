"""The ``dicom-node`` command line."""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from node.config import Config, ConfigError
from node.net.tls import TlsFileError
from node.store.database import DatabaseError
from node.store.jobstore import JobStore, JobStoreError, SeriesState
from node.imaging.source import DEFAULT_MAX_DECODED_MB, DEFAULT_MAX_FRAME_MB
from node.telemetry.logsetup import LogSettings, setup_logging
from node.config.pipeline import Channels, Clip, Equalise, OutputFormat, Pipeline, PipelineError, parse_window

if TYPE_CHECKING:
    from node.app.process_series import SeriesResult
    from node.process.series import InputSeries

__all__ = ["main"]

log = logging.getLogger("node.app.cli")

# Options whose values may start with "-" (a negative window centre, a negative clip bound).
_SIGNED_VALUE_OPTIONS = ("--window", "--clip")
_NEGATIVE_VALUE = re.compile(r"^-\d")


def _join_signed_values(argv: Sequence[str]) -> list[str]:
    """Turn ``--window -600,1500`` into ``--window=-600,1500`` so argparse does not see an option."""
    out: list[str] = []
    items = list(argv)
    index = 0
    while index < len(items):
        item = items[index]
        if item in _SIGNED_VALUE_OPTIONS and index + 1 < len(items) and _NEGATIVE_VALUE.match(items[index + 1]):
            out.append(f"{item}={items[index + 1]}")
            index += 2
        else:
            out.append(item)
            index += 1
    return out


def _parse_clip(text: str) -> Clip:
    low, sep, high = text.partition(",")
    if not sep:
        raise argparse.ArgumentTypeError(f"--clip {text!r}: write MIN,MAX (either may be empty)")
    try:
        clip = Clip(float(low) if low.strip() else None, float(high) if high.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--clip {text!r}: MIN and MAX must be numbers") from None
    if clip.min is None and clip.max is None:
        raise argparse.ArgumentTypeError("--clip: give MIN, MAX or both")
    if clip.min is not None and clip.max is not None and clip.min >= clip.max:
        raise argparse.ArgumentTypeError(f"--clip {text!r}: MIN must be below MAX")
    return clip


def _window_arg(text: str):
    try:
        return parse_window(text)
    except PipelineError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _colormap_arg(text: str) -> str:
    from node.imaging.colormap import UnknownColormap, check_colormap

    try:
        return check_colormap(text)
    except UnknownColormap as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _histogram_arg(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in (".svg", ".png"):
        raise argparse.ArgumentTypeError(f"{text!r}: write FILE.svg or FILE.png")
    return path


def _histogram_path(path: Path, number: int, count: int) -> Path:
    """``--histogram FILE`` for series *number* of *count*: FILE itself for one series, else FILE-N."""
    return path if count == 1 else path.with_name(f"{path.stem}-{number}{path.suffix}")


def _add_process_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "process",
        help="process DICOM files or folders into Secondary Captures, PNGs, presentation states or volumes",
        description="Read DICOM files (folders recursively), group them into series, window or "
        "equalise them, and write Secondary Capture DICOM or PNG files (or presentation states, "
        "--format gsps) under --out as STUDY_UID/DERIVED_SERIES_UID/SOP_UID.dcm|png, or volumes "
        "(--format nifti|npz) as STUDY_UID/DERIVED_SERIES_UID/volume.nii.gz|npz with volume.json.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM files or folders")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--config", type=Path, default=None, metavar="FILE",
                   help="run the configured pipelines instead of the options below: each series takes the "
                   "pipeline of the route that matches it, as serve does (default: "
                   f"${CONFIG_VARIABLE} when set and no pipeline option is given); outputs are written "
                   "under --out, never delivered")
    p.add_argument("--pipeline", metavar="NAME",
                   help="with --config: run this configured pipeline on every series, whatever the routes say")
    add_pipeline_options(p, [f.value for f in OutputFormat], "sc",
                         "sc / sc16: Secondary Capture 8/16-bit; png / png16: PNG 8/16-bit; gsps: one Grayscale "
                         "Softcopy Presentation State per series showing the source images as the pipeline does, "
                         "no pixels copied (grey images; not with --grey or several --window/--equalise channels); "
                         "nifti / npz: one volume per series (.nii.gz / .npz, with a .json sidecar) (default sc)")
    p.add_argument("--cmap", type=_colormap_arg, metavar="NAME",
                   help="colour the 8-bit grey result through a matplotlib colour map (bone, ocean_r, viridis ...; "
                   "_r reverses): RGB output, sc or png only")
    p.add_argument("--histogram", type=_histogram_arg, metavar="FILE.svg|FILE.png",
                   help="also write the picture of the value histograms before (HU for CT) and after processing, "
                   "with the equalisation bin edges; with several series FILE-1, FILE-2 ... in the order logged")
    p.set_defaults(func=_run_process, parser=p)


def add_pipeline_options(p: argparse.ArgumentParser, formats: Sequence[str], default_format: str,
                         format_help: str) -> None:
    """The options that make a pipeline (and the decode limits), shared by ``process`` and ``export``."""
    p.add_argument(
        "--window", action="append", type=_window_arg, default=[], metavar="PRESET|C,W|file",
        help="window: a preset (brain, subdural, stroke, brain_bone, brain_soft, lungs, mediastinum, "
        "abdomen_soft, liver, spine_soft, spine_bone), CENTER,WIDTH, or 'file' (file:N for the Nth); "
        "repeat for colour channels",
    )
    p.add_argument("--equalise", action="store_true", help="histogram equalisation (fastai hist_scaled)")
    p.add_argument("--bins", type=int, default=100, help="equalisation bins (default 100)")
    p.add_argument("--per", choices=("image", "series"), default="image", help="equalise per image or series")
    p.add_argument("--clip", type=_parse_clip, metavar="MIN,MAX", help="clamp modality values first")
    p.add_argument("--no-rescale", action="store_true", help="skip the Modality LUT (rescale) step")
    p.add_argument("--grey", action="store_true", help="convert colour images to grey first")
    p.add_argument("--format", choices=list(formats), default=default_format, help=format_help)
    p.add_argument("--keep-patient", action="store_true",
                   help="volume outputs: write the patient's name and ID into the JSON sidecar (default: never)")
    p.add_argument(
        "--max-decoded-mb", type=_megabytes, default=DEFAULT_MAX_DECODED_MB, metavar="MB",
        help="refuse a file whose pixels decode to more than this many MB in all "
        f"(as [node] max_decoded_mb; default {DEFAULT_MAX_DECODED_MB})",
    )
    p.add_argument(
        "--max-frame-mb", type=_megabytes, default=DEFAULT_MAX_FRAME_MB, metavar="MB",
        help="refuse a file one of whose frames decodes to more than this many MB "
        f"(as [node] max_frame_mb; default {DEFAULT_MAX_FRAME_MB})",
    )


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a folder tree of series as a dataset of volumes (NIfTI or NumPy) with index.csv",
        description="Read DICOM files (folders recursively), group them into series and write one volume per "
        "series (per stack; parts where the spacing changes) as OUT/STUDY_UID/SERIES_UID/volume.nii.gz|npz with a "
        "volume.json sidecar, and OUT/index.csv listing every volume. Series already exported into OUT with the "
        "same pipeline are skipped, so a run that was stopped can be run again.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM files or folders")
    p.add_argument("--out", required=True, type=Path, help="dataset folder")
    add_pipeline_options(p, [f.value for f in OutputFormat if f.is_volume], OutputFormat.NIFTI.value,
                         "nifti: .nii.gz; npz: NumPy .npz (volume, affine, spacing); each with a .json sidecar "
                         "(default nifti)")
    p.add_argument("--workers", type=_workers, default=1, metavar="N",
                   help="series exported at once, each in its own process (default 1)")
    p.set_defaults(func=_run_export, parser=p)


def _workers(text: str) -> int:
    """``--workers``: a whole number from 1 to 64."""
    if not text.strip().isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of processes from 1 to 64")
    return int(text)


def _run_export(args: argparse.Namespace) -> int:
    from node.app.export import export
    from node.imaging.source import DecodeLimits

    pipeline = _pipeline_from_args(args)
    limits = DecodeLimits.from_mb(args.max_decoded_mb, args.max_frame_mb,
                                  decoded_setting="--max-decoded-mb", frame_setting="--max-frame-mb")
    return export(args.inputs, args.out, pipeline, limits=limits, workers=args.workers, log_settings=args.log_settings)


def _megabytes(text: str) -> int:
    """A decode limit in MB: a whole number >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of MB, at least 1")
    return int(text)


def _pipeline_from_args(args: argparse.Namespace) -> Pipeline:
    if not 1 <= args.bins <= 100_000:
        raise PipelineError(f"--bins must be from 1 to 100000, got {args.bins}")
    equalise = Equalise(bins=args.bins, per=args.per) if args.equalise else None
    display = None
    if len(args.window) + (equalise is not None) > 1:
        if len(args.window) + (equalise is not None) > 3:
            raise PipelineError("at most 3 channels (RGB): --window given too often")
        display = Channels(tuple(args.window), equalise)
    elif args.window:
        display = args.window[0]
    elif equalise:
        display = equalise
    return Pipeline(
        name="cli",
        output=OutputFormat(args.format),
        grey=args.grey,
        rescale=not args.no_rescale,
        clip=args.clip,
        display=display,
        colormap=getattr(args, "cmap", None),  # process only: export writes volumes of values
        keep_patient=args.keep_patient,
    )


#: ``process`` options that make a pipeline (or set its decode limits): a configured run takes
#: both from the config, so these are refused beside ``--config``/``--pipeline``.
_PIPELINE_OPTIONS = ("window", "equalise", "bins", "per", "clip", "cmap", "no_rescale", "grey", "format",
                     "keep_patient", "max_decoded_mb", "max_frame_mb")


def _pipeline_options_given(args: argparse.Namespace) -> list[str]:
    """The pipeline options of *args* that differ from their defaults, as ``--option``."""
    return ["--" + dest.replace("_", "-") for dest in _PIPELINE_OPTIONS
            if getattr(args, dest) != args.parser.get_default(dest)]


def _configured_run(args: argparse.Namespace) -> Config | None:
    """The config a ``process`` run takes its pipelines from, or None for a pipeline of the options.

    ``--config``/``--pipeline`` beside pipeline options is a usage error (exit 2); ``$DICOM_NODE_CONFIG``
    is used only when no pipeline option is given.
    """
    from node.config import load_config

    given = _pipeline_options_given(args)
    if args.config is None and args.pipeline is None and (given or _config_from_environment() is None):
        return None
    if args.config is None:
        args.config = _config_from_environment()  # None with --pipeline alone: the embedded default
    if given:
        args.parser.error(f"{' '.join(given)} cannot be combined with --config/--pipeline: a configured run "
                          "takes its pipelines and decode limits from the config")
    config = load_config(args.config)
    if args.pipeline is not None and args.pipeline not in config.pipelines:
        known = ", ".join(config.pipelines) or "none"
        args.parser.error(f"--pipeline {args.pipeline!r}: no such pipeline in {config.source}; defined: {known}")
    return config


def _configured_pipeline(config: Config, args: argparse.Namespace, series: "InputSeries") -> Pipeline | None:
    """The pipeline *series* goes through (``--pipeline``, else its route's), or None: logged why."""
    if args.pipeline is not None:
        return config.pipelines[args.pipeline]
    from node.process.routing import explain_route, route_for

    header = series.images[0].header
    route = route_for(config, header)
    if route is None or route.discards:
        log.warning("series %s: nothing written %s", series.series_uid, explain_route(config, header))
        return None
    log.info("series %s %s", series.series_uid, explain_route(config, header))
    return config.pipelines[route.pipeline]


def _run_process(args: argparse.Namespace) -> int:
    from node.imaging.source import DecodeLimits, NotDicom
    from node.app.process_series import process_series
    from node.process.series import find_files, group_series, open_images

    config = _configured_run(args)
    if config is None:
        pipeline = _pipeline_from_args(args)
        log.info("pipeline: %s", pipeline.describe())
        limits = DecodeLimits.from_mb(args.max_decoded_mb, args.max_frame_mb,
                                      decoded_setting="--max-decoded-mb", frame_setting="--max-frame-mb")
    else:
        which = f"pipeline {args.pipeline} for every series" if args.pipeline else "the pipeline of each series' route"
        log.info("config: %s (%s)", config.source, which)
        limits = DecodeLimits.from_mb(config.node.max_decoded_mb, config.node.max_frame_mb)
    try:
        paths = list(find_files(args.inputs))
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 2
    log.info("%d files found", len(paths))
    images, failures = open_images(paths, limits)
    named = {Path(item) for item in args.inputs}
    not_dicom = [f for f in failures if isinstance(f, NotDicom) and f.path not in named]
    failures = [f for f in failures if f not in not_dicom]
    for skipped in not_dicom:
        log.warning("skipped %s", skipped)
    for failure in failures:
        log.error("failed %s", failure)
    now = datetime.datetime.now().astimezone()
    written = not_written = unwritten_histograms = 0
    all_series = group_series(images)
    for number, series in enumerate(all_series, start=1):
        log.info(
            "series %d/%d %s: %d instances, %d frames",
            number, len(all_series), series.series_uid, len(series.images), series.frames,
        )
        if config is not None:
            pipeline = _configured_pipeline(config, args, series)
            if pipeline is None:
                not_written += 1
                continue
        result = process_series(series, pipeline, args.out, now=now, histograms=args.histogram is not None)
        written += len(result.outputs)
        if args.histogram is not None and not _write_histogram(
            _histogram_path(args.histogram, number, len(all_series)), result
        ):
            unwritten_histograms += 1
        failures.extend(result.failures)
        log.info(
            "series %s -> %s: %d outputs, %d failed, %.1f s",
            series.series_uid, result.derived_series_uid, len(result.outputs), len(result.failures), result.seconds,
        )
    log.info(
        "done: %d outputs in %s; %d files failed, %d not DICOM skipped, of %d%s",
        written, args.out, len(failures), len(not_dicom), len(paths),
        f"; {not_written} series not processed (no route, or discarded)" if not_written else "",
    )
    return 1 if failures or unwritten_histograms else 0


def _write_histogram(path: Path, result: "SeriesResult") -> bool:
    """Write the histogram picture of one processed series, logged; False when it could not be written."""
    from node.outputs.histogram import write_histogram

    if result.histograms is None:
        log.warning("series %s: no histogram written to %s: no grey values were rendered (colour passed "
                    "through, every image failed, or output gsps, nifti or npz)", result.series_uid, path)
        return True
    try:
        write_histogram(path, result.histograms)
    except OSError as exc:
        log.error("series %s: cannot write the histogram %s: %s", result.series_uid, path, exc.strerror or exc)
        return False
    log.info("series %s: histogram written to %s", result.series_uid, path)
    return True


def _add_route_parser(sub: argparse._SubParsersAction) -> None:
    route = sub.add_parser(
        "route", help="which route, pipeline and destinations each series of some files would take",
        description="Read the headers of DICOM files (folders recursively), group them into series and print, "
        "per series, what the configured node would do with it: the route that matches, its pipeline and "
        "destinations; the discard route; or that no route matches, and why. Nothing is processed or sent.",
    )
    _add_config_option(route)
    route.add_argument("inputs", nargs="+", metavar="INPUT", help="DICOM files or folders")
    route.set_defaults(func=_run_route)


def _run_route(args: argparse.Namespace) -> int:
    from node.config import load_config
    from node.process.routing import group_headers, read_headers, series_line
    from node.process.series import find_files

    config = load_config(args.config)
    try:
        paths = list(find_files(args.inputs))
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return 2
    headers, skipped = read_headers(paths)
    for message in skipped:
        log.warning("skipped %s", message)
    all_series = group_headers(headers)
    for series in all_series:
        print(series_line(config, series))
    log.info("config %s: %d series in %d files (%d skipped)", config.source, len(all_series), len(paths), len(skipped))
    return 0


#: The environment variable whose value is the default of ``--config``.
CONFIG_VARIABLE = "DICOM_NODE_CONFIG"


def _config_from_environment() -> Path | None:
    """``$DICOM_NODE_CONFIG`` as a path (None when unset or empty)."""
    value = os.environ.get(CONFIG_VARIABLE, "").strip()
    return Path(value) if value else None


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``, defaulting to ``$DICOM_NODE_CONFIG``, else the embedded default."""
    parser.add_argument("--config", type=Path, default=_config_from_environment(),
                        help=f"TOML config file (default: ${CONFIG_VARIABLE} when set, else the embedded default)")


def _add_service_parsers(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the node: receive, process, deliver")
    _add_config_option(serve)
    serve.add_argument("--role", choices=("all", "receiver", "worker"), default="all",
                       help="all (default): receive and process; receiver: SCP, DICOMweb poller, assembly; "
                       "worker: processing and delivery (several of each share [store] and shared_dir)")
    serve.set_defaults(func=_run_serve)
    status = sub.add_parser("status", help="series and deliveries from the job store")
    _add_config_option(status)
    status.add_argument("job", nargs="?", type=int,
                        help="one series job id: its times, calling AE, route, pipeline, deliveries and events")
    status.add_argument("--limit", type=int, default=20, help="how many recent series to list")
    status.set_defaults(func=_run_status)
    retry = sub.add_parser("retry", help="retry failed series (deliveries, or processing)")
    _add_config_option(retry)
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("job", nargs="?", type=int, help="series job id (see dicom-node status)")
    which.add_argument("--all-failed", action="store_true", help="every failed series")
    retry.set_defaults(func=_run_retry)


def _add_operator_parsers(sub: argparse._SubParsersAction) -> None:
    echo = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    echo.add_argument("host")
    echo.add_argument("port", type=int)
    echo.add_argument("--aet", required=True, help="the peer's (called) AE title")
    echo.add_argument("--calling-aet", default="DICOMNODE", help="our AE title (default DICOMNODE)")
    echo.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the peer")
    echo.set_defaults(func=_run_echo)
    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    check = config_sub.add_parser("check", help="validate a config file and print the effective config")
    check.add_argument("file", type=Path, nargs="?", default=_config_from_environment(),
                       help=f"TOML file (default: ${CONFIG_VARIABLE} when set, else the embedded default)")
    check.set_defaults(func=_run_config_check)


def _run_echo(args: argparse.Namespace) -> int:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=args.calling_aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = args.timeout
    assoc = ae.associate(args.host, args.port, ae_title=args.aet)
    if not assoc.is_established:
        print(f"C-ECHO {args.aet}@{args.host}:{args.port}: association failed "
              f"({'rejected' if assoc.is_rejected else 'no answer or aborted'})")
        return 1
    status = assoc.send_c_echo()
    assoc.release()
    code = int(status.Status) if "Status" in status else None
    ok = code == 0
    print(f"C-ECHO {args.aet}@{args.host}:{args.port}: " + ("Success" if ok else f"failed, status {code!r}"))
    return 0 if ok else 1


def _run_config_check(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from node.config import load_config

    config = load_config(args.file, check_machine=True)  # as serve checks it

    effective = {
        "source": config.source,
        "node": dataclasses.asdict(config.node),
        "http": dataclasses.asdict(config.http),
        "delivery": dataclasses.asdict(config.delivery),
        "pipelines": {name: {"does": p.describe(), "output": p.output.value} for name, p in config.pipelines.items()},
        "destinations": {name: {"kind": d.kind, **dataclasses.asdict(d)} for name, d in config.destinations.items()},
        "routes": [dataclasses.asdict(r) for r in config.routes],
    }
    print(json.dumps(effective, indent=2, default=str))
    print(f"{config.source}: OK", file=sys.stderr)
    return 0


_STUDY_DATE_ARG = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _study_date_arg(text: str) -> datetime.date:
    """A StudyDate option: ``YYYY-MM-DD``, a real calendar day."""
    if _STUDY_DATE_ARG.match(text.strip()):
        try:
            return datetime.datetime.strptime(text.strip(), "%Y-%m-%d").date()
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a date: write YYYY-MM-DD (e.g. 2015-06-30)")


# node.receive.poller.BACKFILL_CHUNKS, spelled out so that building the parser does not import the DICOMweb client.
_BACKFILL_CHUNKS = ("day", "month", "year")


def _add_poll_parser(sub: argparse._SubParsersAction) -> None:
    poll = sub.add_parser(
        "poll", help="pull new series from the configured DICOMweb sources, or backfill a StudyDate range",
        description="Poll the [[sources]] once, as serve does on their schedule: series whose StudyDate is in "
        "the window (the first poll looks lookback_hours back; later polls start at the saved watermark minus "
        "late_arrival_hours) are fetched into the spool and recorded in the job store, where a running node "
        "(or the next start) processes them. Studies dated before the window are never found by the "
        "schedule: --since backfills a StudyDate range once, searched a --chunk at a time, each query paged "
        "by page_size, through the same skip rules (series the node made; series already handled or spooled), "
        "leaving the watermark as it was. Exit code 0: complete; 1: some requests or series failed (run it "
        "again: what was fetched is skipped); 2: usage or config errors.",
        epilog="example: dicom-node poll --config node.toml --once --source archive --since 2015-01-01 "
        "--until 2015-12-31",
    )
    _add_config_option(poll)
    poll.add_argument("--source", help="only this source (default: all)")
    poll.add_argument("--once", action="store_true", required=True,
                      help="one pass, then exit (serve polls on the schedule); for cron and tests")
    poll.add_argument("--since", type=_study_date_arg, metavar="YYYY-MM-DD",
                      help="backfill: fetch every series with a StudyDate from this day on (to --until) instead "
                      "of polling the window; the watermark stays as it was")
    poll.add_argument("--until", type=_study_date_arg, metavar="YYYY-MM-DD",
                      help="backfill: the last StudyDate (default: today); only with --since")
    poll.add_argument("--chunk", choices=_BACKFILL_CHUNKS, metavar="|".join(_BACKFILL_CHUNKS),
                      help="backfill: one query (paged) per calendar day, month or year of the range, each "
                      "logged with its counts (default: month); only with --since")
    poll.set_defaults(func=_run_poll)


def _backfill_range(args: argparse.Namespace) -> tuple[datetime.date, datetime.date] | None:
    """The ``--since``/``--until`` range (None: a scheduled poll); UsageError when they do not fit."""
    if args.since is None:
        for option, value in (("--until", args.until), ("--chunk", args.chunk)):
            if value is not None:
                raise _UsageError(f"{option} is for a backfill: give --since YYYY-MM-DD too")
        return None
    until = args.until if args.until is not None else datetime.date.today()
    if args.since > until:
        raise _UsageError(f"--since {args.since:%Y-%m-%d} is after --until {until:%Y-%m-%d}"
                          + ("" if args.until is not None else " (today, its default)"))
    return args.since, until


class _UsageError(Exception):
    """Options that do not fit together (exit code 2)."""


def _run_poll(args: argparse.Namespace) -> int:
    from node.config import load_config
    from node.store.jobstore import job_store_for
    from node.receive.poller import DicomWebPoller
    from node.store.spool import Spool

    try:
        backfill = _backfill_range(args)
    except _UsageError as exc:
        log.error("%s", exc)
        return 2
    config = load_config(args.config)
    if args.source and args.source not in config.sources:
        log.error("no source %r in %s; sources: %s", args.source, config.source, ", ".join(config.sources) or "none")
        return 2
    if not config.sources:
        log.error("%s has no [[sources]]", config.source)
        return 2
    names = [args.source] if args.source else list(config.sources)
    jobs = job_store_for(config)
    failed = False
    try:
        spool = Spool(config.node.shared / "spool")
        for name in names:
            poller = DicomWebPoller(config.sources[name], spool=spool, jobs=jobs, pipeline_names=config.pipelines)
            if backfill is None:
                result = poller.poll_once()
                what = name
            else:
                result = poller.backfill(*backfill, chunk=args.chunk or "month")
                what = f"{name}: StudyDate {backfill[0]:%Y-%m-%d} to {backfill[1]:%Y-%m-%d}"
            print(f"{what}: {result.series_found} series found, {result.series_fetched} fetched "
                  f"({result.instances_fetched} instances), {result.skipped_known} known, "
                  f"{result.skipped_derived} derived skipped, {len(result.errors)} errors")
            for error in result.errors:
                print(f"  error: {error}")
            failed = failed or bool(result.errors)
    finally:
        jobs.close()
    return 1 if failed else 0


def _run_serve(args: argparse.Namespace) -> int:
    from node.config import load_config
    from node.app.service import ListenerError, NodeService

    config = load_config(args.config, check_machine=True)
    log.info("config: %s (role %s)", config.source, args.role)
    try:
        NodeService(config, log_settings=args.log_settings, role=args.role).run_forever()
    except ListenerError as exc:  # a port in use: one line naming the listener and port, never a traceback
        log.error("%s", exc)
        return 2
    return 0


def _open_jobs(args: argparse.Namespace, config: Config | None = None) -> JobStore:
    """The job store of the node whose config *args* name; a SQLite store that does not exist is not
    created (JobStoreError naming the file, the config and how to name another)."""
    from node.config import load_config
    from node.store.jobstore import job_store_for

    config = config if config is not None else load_config(args.config)
    path = config.node.data_dir / "jobs.sqlite"
    if config.store.url is None and not path.is_file():
        raise JobStoreError(path, f"no job store here ({args.command} reads the store of a node that has run; "
                                  f"config: {config.source}, [node] data_dir {config.node.data_dir}): give the "
                                  f"node's config with --config FILE or ${CONFIG_VARIABLE}")
    return job_store_for(config)


def _run_status(args: argparse.Namespace) -> int:
    import shutil

    from node.config import load_config

    config = load_config(args.config)
    node = config.node
    jobs = _open_jobs(args, config)
    if args.job is not None:
        try:
            return _print_one_series(jobs, args.job, config.delivery.max_attempts)
        finally:
            jobs.close()
    try:
        free_mb = shutil.disk_usage(node.data_dir).free // 2**20
        print(f"disk: {free_mb} MB free in {node.data_dir}; C-STORE refused below {node.min_free_disk_mb} MB"
              + (" (REFUSING NOW)" if free_mb < node.min_free_disk_mb
                 else f" ({free_mb - node.min_free_disk_mb} MB headroom)"))
        counts = jobs.counts()
        print("series by state: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"))
        for row in jobs.list_series(limit=args.limit):
            line = (f"{row['id']:>6}  {row['state']:<10}  {row['instances']:>5} inst  "
                    f"{row['modality'] or '-':<3}  {row['series_uid']}")
            if row["error"]:
                line += f"  error: {row['error']}"
            print(line)
    finally:
        jobs.close()
    return 0


def _print_one_series(jobs: JobStore, series_id: int, max_attempts: int) -> int:
    """Print one series as the page ``/series/{id}`` shows it; 1 with one line when there is no such job."""
    from node.app.seriesview import series_text, series_view

    row = jobs.series(series_id)
    if row is None:
        print(f"job {series_id}: no such job (dicom-node status lists them)")
        return 1
    print("\n".join(series_text(series_view(row, max_attempts))))
    return 0


def _run_retry(args: argparse.Namespace) -> int:
    from node.config import load_config

    config = load_config(args.config)
    jobs = _open_jobs(args, config)
    try:
        if args.all_failed:
            ids = [row["id"] for row in jobs.list_series(limit=2**31 - 1, state=SeriesState.FAILED.value)]
            if not ids:
                print("no failed series: nothing to retry")
        else:
            ids = [args.job]
        done = [_retry_one(jobs, config, series_id) for series_id in ids]
    finally:
        jobs.close()
    if any(done):
        print(f"{sum(done)} of {len(done)} series queued again (a running node picks them up)")
    return 0 if all(done) else 1


def _retry_one(jobs: JobStore, config: Config, series_id: int) -> bool:
    """Retry one series if it can be, printing one line of what was done and why; True when queued again."""
    series = jobs.series(series_id)
    if series is None:
        print(f"job {series_id}: no such job (dicom-node status lists them)")
        return False
    state = series["state"]
    if state == SeriesState.UNROUTED.value:
        problem = _still_unrouted(jobs, config, series_id)
        if problem is not None:
            print(f"job {series_id}: unrouted ({series['error']}): not queued again: {problem}")
            return False
    elif state != SeriesState.FAILED.value:
        print(f"job {series_id}: {state}{_delivery_attempts(series, config)}: not failed, nothing to retry")
        return False
    failed = [d for d in series["deliveries"] if d["state"] == "failed"]
    if not jobs.retry([series_id]):  # its state changed since it was read
        now = jobs.series(series_id)
        print(f"job {series_id}: now {now['state'] if now else 'gone'}: nothing done")
        return False
    if failed:
        sent = ", ".join(f"{d['destination']} (failed after {d['attempts']} attempts)" for d in failed)
        print(f"job {series_id}: {state}: delivery queued again, attempt 1 of {config.delivery.max_attempts}, "
              f"to {sent}")
    else:
        print(f"job {series_id}: {state} ({series['error']}): queued for processing again, attempt 1 of "
              f"{config.node.max_processing_attempts}")
    return True


def _delivery_attempts(series: dict, config: Config) -> str:
    """``, delivery to pacs: attempt 3 of 8`` for each delivery not yet delivered."""
    waiting = [d for d in series["deliveries"] if d["state"] not in ("delivered", "failed")]
    return "".join(f", delivery to {d['destination']}: {d['state']} after attempt {d['attempts']} of "
                   f"{config.delivery.max_attempts}" for d in waiting)


def _still_unrouted(jobs: JobStore, config: Config, series_id: int) -> str | None:
    """Why an unrouted series would be unrouted again under *config*; None when a route matches it now."""
    import pydicom

    from node.process.routing import route_for

    if jobs.is_derived(jobs.series(series_id)["series_uid"]):
        return "this node derived it: it is never processed again"
    for _sop_uid, path in jobs.instances(series_id):
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - one unreadable file: try the next
            log.warning("job %d: %s cannot be read: %s", series_id, path, exc)
            continue
        if route_for(config, header) is None:
            return (f"no route of {config.source} matches it now either; add a route, restart the node with "
                    "it, then retry")
        return None
    return "none of its spooled instances can be read"


def _add_store_parser(sub: argparse._SubParsersAction) -> None:
    store = sub.add_parser("store", help="job store tools")
    store_sub = store.add_subparsers(dest="store_command", required=True, metavar="COMMAND")
    rebuild = store_sub.add_parser(
        "rebuild", help="set a damaged job store aside and record the spool into a new one",
        description="With the node stopped: move data_dir/jobs.sqlite (with its -wal and -shm) aside as "
        "jobs.sqlite.corrupt-<time> and record every spooled instance into a new job store. Every series "
        "is then processed and delivered again when the node starts (derived UIDs are deterministic: "
        "receivers get replacements, not duplicates). A readable store is left alone unless --force.",
    )
    _add_config_option(rebuild)
    rebuild.add_argument("--force", action="store_true", help="rebuild even a store that passes the integrity check")
    rebuild.set_defaults(func=_run_store_rebuild)


def _run_store_rebuild(args: argparse.Namespace) -> int:
    from node.config import load_config
    from node.store.jobstore import JobStore
    from node.store.spool import Spool

    config = load_config(args.config)
    data_dir = config.node.data_dir
    path = data_dir / "jobs.sqlite"
    if not path.exists() and not (data_dir / "spool").is_dir():  # nothing to rebuild from: not created here
        raise JobStoreError(path, f"no job store and no spool {data_dir / 'spool'} here (config: {config.source}, "
                                  f"[node] data_dir {data_dir}): give the node's config with --config FILE or "
                                  f"${CONFIG_VARIABLE}")
    spool = Spool(data_dir / "spool")
    rebuilt = JobStore.rebuild(path, spool, only_if_damaged=not args.force)
    if rebuilt.recorded is None:
        print(f"{path}: readable (integrity check ok): nothing done; --force rebuilds it anyway")
        return 1
    if rebuilt.damage is not None:
        print(f"{path}: damaged ({rebuilt.damage})")
    for moved in rebuilt.set_aside:
        print(f"set aside: {moved}")
    recorded = rebuilt.recorded
    print(f"{path}: new job store: {recorded.instances} instances of {recorded.series} series recorded from "
          f"{spool.root}" + (f"; {recorded.unreadable} spool files unreadable (kept, see above)"
                             if recorded.unreadable else ""))
    print("start the node: every recorded series is processed and delivered again")
    return 1 if recorded.unreadable else 0


def _add_global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """``--log-level`` and ``--log-format``: with their defaults on the top parser; on each subcommand
    without (``argparse.SUPPRESS``), so that one given after the subcommand is taken and one given
    before it is not overwritten."""
    parser.add_argument("--log-level", default="INFO" if defaults else argparse.SUPPRESS,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default INFO")
    parser.add_argument("--log-format", default="text" if defaults else argparse.SUPPRESS, choices=("text", "json"),
                        help="text for people, json (one object a line) for log collectors (default text)")


def _subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand's parser under *parser*, nested ones (``config check``) included."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:  # noqa: SLF001 - argparse has no public walk of its subparsers
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subcommand_parsers(child)]
    return found


def _build_parser() -> argparse.ArgumentParser:
    from node import __version__

    parser = argparse.ArgumentParser(prog="dicom-node", description="A DICOM processing node.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_process_parser(sub)
    _add_export_parser(sub)
    _add_route_parser(sub)
    _add_service_parsers(sub)
    _add_operator_parsers(sub)
    _add_poll_parser(sub)
    _add_store_parser(sub)
    for child in _subcommand_parsers(parser):
        _add_global_options(child, defaults=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dicom-node`` command; returns the exit code."""
    parser = _build_parser()
    args = parser.parse_args(_join_signed_values(sys.argv[1:] if argv is None else argv))
    args.log_settings = LogSettings(args.log_level, args.log_format)
    setup_logging(args.log_settings)
    try:
        return args.func(args)
    except (PipelineError, ConfigError, TlsFileError) as exc:
        log.error("%s", exc)
        return 2
    except JobStoreError as exc:  # one line naming the file and the fix; never a traceback
        log.error("%s", exc.message(getattr(args, "config", None)))
        return 3
    except DatabaseError as exc:  # PostgreSQL unreachable, a newer schema: one line, never a traceback
        log.error("%s", exc)
        return 3


if __name__ == "__main__":
    sys.exit(main())
