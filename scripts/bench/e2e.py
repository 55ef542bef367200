"""End to end: a 300-slice CT pushed into ``dicom-node serve``, windowed to SC, delivered to Orthanc.

Run from the checkout (a venv with the project's test dependencies; dcmtk and Orthanc installed)::

    scripts/bench/run e2e               # or: .venv/bin/python scripts/bench/e2e.py [--settle 2] [--associations 1]

The node routes CT through a ``rescale`` + ``window brain`` pipeline (8-bit Secondary Capture) to
an Orthanc destination (C-STORE). Measured:

* seconds from the last instance acknowledged (storescu exits) until all 300 derived instances
  are in Orthanc, minus the settle time; slices/s from that;
* the node's own log: settle/queue, open (headers), ``process_series`` ("N outputs in X s"),
  wait for the delivery loop, send ("delivered ... in X s"), Orthanc visibility;
* a cProfile run of ``node.app.process_series.process_series`` on the spooled series, in this process,
  summarised by phase (decode, render, SC header, encode/write, fsync), and the unprofiled time;
* the send alone: the 300 derived files into a fresh Orthanc with dcmtk ``storescu`` and with the
  node's ``DicomSender`` over 1, 2 and 4 associations (the ``associations`` destination setting).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import pstats
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl  # noqa: E402
from tests.support import (  # noqa: E402
    BRAIN, NodeProcess, OrthancServer, dicom_destination, node_config, pipeline, route,
)

N = 300
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")


def config_extra(orthanc: OrthancServer, associations: int) -> str:
    """Config tables: CT through a brain window (SC) to Orthanc over *associations* associations."""
    return (pipeline("ct-brain", BRAIN, "sc")
            + dicom_destination("pacs", orthanc.dicom_port, orthanc.aet, associations=associations)
            + route("ct-brain", ["pacs"], match={"Modality": "CT"}))


def log_events(text: str) -> list[tuple[float, str, str]]:
    """(epoch seconds, level, message) of every line of the node's log."""
    events = []
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            stamp = datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            events.append((stamp, match[2], match[4]))
    return events


def first(events, pattern: str) -> tuple[float, re.Match]:
    regex = re.compile(pattern)
    for stamp, _, message in events:
        match = regex.search(message)
        if match:
            return stamp, match
    raise RuntimeError(f"no log line matches {pattern!r}")


# --------------------------------------------------------------------------- the service run


def run_service(files: list[Path], work: Path, settle: float, associations: int) -> dict:
    with OrthancServer(aet="ORTHANC", workdir=work / "orthanc") as orthanc:
        port = bl.free_port()
        node = NodeProcess(node_config(work / "var", port, settle=settle, extra=config_extra(orthanc, associations)),
                           work, port=port)
        try:
            node.start()
            bl.sync_disks()
            push_seconds = bl.push(port, files, called_aet=node.ae_title)
            acked = time.time()
            deadline = time.monotonic() + 600
            while True:
                count = orthanc.get("/statistics")["CountInstances"]
                if count >= N:
                    break
                if time.monotonic() > deadline or not node.alive():
                    raise RuntimeError(f"{count} of {N} derived instances in Orthanc\n{node.log()[-3000:]}")
                time.sleep(0.05)
            done = time.time()
            # Orthanc counts the last instance before the node has released the association and
            # logged the delivery: wait for that line (the timings come from it)
            delivered_line = re.compile(rf"delivered {N} file\(s\) to ")
            while not delivered_line.search(text := node.log()) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            node.stop()
        orthanc.stop(grace=0)
    if "Traceback" in text or " ERROR " in text:
        raise RuntimeError(f"node logged errors:\n{text[-3000:]}")
    events = log_events(text)
    queued, _ = first(events, r"\d+ series (settled and )?queued")  # the wording changed once
    opened, _ = first(events, rf"{N} instances -> pipeline")
    processed, m_proc = first(events, rf"-> [\d.]+: {N} outputs in ([\d.]+) s")
    delivered, m_send = first(events, rf"delivered {N} file\(s\) to .* in ([\d.]+) s")
    process_s, send_s = float(m_proc[1]), float(m_send[1])
    return {
        "push": push_seconds, "acked": acked, "done": done, "queued": queued, "opened": opened,
        "processed": processed, "process_s": process_s, "delivered": delivered, "send_s": send_s,
        "config": node.config_path, "spool": work / "var" / "spool",
    }


# --------------------------------------------------------------------------- profile of process_series


def _cum(stats: pstats.Stats, func: str, file_part: str) -> float:
    """Inclusive seconds of a function, summed over its entries whose file path contains file_part."""
    total = 0.0
    for (path, _, name), (_, _, _, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        if name == func and file_part in path:
            total += cumtime
    return total


def _own(stats: pstats.Stats, func: str) -> float:
    """Own seconds of a function or built-in (``<built-in method posix.fsync>`` for "fsync")."""
    return sum(tt for (_, _, name), (_, _, tt, _, _) in stats.stats.items()  # type: ignore[attr-defined]
               if name == func or name.endswith(f".{func}>"))


def _threads_kw(threads: int) -> dict:
    """``threads=`` for process_series when this version of the node has it."""
    import inspect

    from node.app.process_series import process_series
    return {"threads": threads} if "threads" in inspect.signature(process_series).parameters else {}


def profile_processing(spool: Path, config_path: Path, work: Path) -> tuple[float, dict[str, float], dict[str, float]]:
    """(open_images s, {label: unprofiled process_series s}, phase -> profiled seconds, one thread)."""
    import os

    from node.config import load_config
    from node.app.process_series import process_series
    from node.process.series import InputSeries, instance_order, open_images

    paths = sorted(spool.rglob("*.dcm"))
    pipeline = load_config(config_path).pipelines["ct-brain"]
    started = time.perf_counter()
    images, failures = open_images(paths)
    open_s = time.perf_counter() - started
    if failures or len(images) != N:
        raise RuntimeError(f"{len(images)} images, failures: {failures[:3]}")
    header = images[0].header
    series = InputSeries(str(header.StudyInstanceUID), str(header.SeriesInstanceUID),
                         sorted(images, key=instance_order))
    now = datetime.datetime.now().astimezone()
    plain: dict[str, float] = {}
    thread_counts = [1] + ([min(4, os.cpu_count() or 1)] if _threads_kw(2) and (os.cpu_count() or 1) > 1 else [])
    for threads in thread_counts:
        bl.sync_disks()
        started = time.perf_counter()
        process_series(series, pipeline, work / f"plain-{threads}", now=now, **_threads_kw(threads))
        plain[f"{threads} thread{'s' if threads > 1 else ''}"] = time.perf_counter() - started

    # cProfile sees one thread only: the images may be processed on a pool thread, so each thread
    # that runs node.process._process_image gets its own profiler, merged afterwards.
    import threading

    import node.app.process_series

    profiler = cProfile.Profile()
    workers: list[cProfile.Profile] = []
    local = threading.local()
    original = node.process._process_image

    def profiled_image(*args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            return original(*args, **kwargs)  # already under the main profiler
        if not hasattr(local, "profiler"):
            local.profiler = cProfile.Profile()
            workers.append(local.profiler)
        local.profiler.enable()
        try:
            return original(*args, **kwargs)
        finally:
            local.profiler.disable()

    bl.sync_disks()
    node.process._process_image = profiled_image
    try:
        profiler.enable()
        result = process_series(series, pipeline, work / "profiled", now=now, **_threads_kw(1))
        profiler.disable()
    finally:
        node.process._process_image = original
    if len(result.outputs) != N:
        raise RuntimeError(f"{len(result.outputs)} outputs")
    stats = pstats.Stats(profiler)
    for worker in workers:
        stats.add(worker)
    total = _cum(stats, "process_series", "node/app/process_series.py")
    decode = _cum(stats, "iter_frames", "node/imaging/source.py")
    render = _cum(stats, "render", "node/process/render.py")
    render_all = _cum(stats, "render_all", "node/process/render.py")
    sc_file = "node/outputs/sc/writer.py"
    write_total = _cum(stats, "write", sc_file)  # SecondaryCaptureSeriesWriter.write, frames rendered inside
    file_s = _cum(stats, "_write_instance_file", sc_file)  # atomic output: header bytes, frames, fsync, rename
    full_headers = _cum(stats, "_encode_in_full", sc_file)
    fsync = _own(stats, "fsync")
    phases = {
        "decode (pydicom iter_pixels)": decode,
        "render (rescale + window + floor)": render,
        "SC header: built and encoded in full (first of the series)": full_headers,
        "SC header: the others, spliced into the series' encoding": write_total - file_s - full_headers,
        "encode/write: fsync (file + folder)": fsync,
        "encode/write: frame checks + pixel bytes + rename": file_s - render_all - fsync,
    }
    phases["other (UIDs, mkdir, thread pool, bookkeeping)"] = total - sum(phases.values())
    phases["= process_series total (profiled)"] = total
    out = io.StringIO()
    shown = pstats.Stats(*workers, stream=out) if workers else stats  # the pool thread: where the work is
    shown.stream = out
    shown.sort_stats("tottime").print_stats(12)
    lines = out.getvalue().splitlines()
    begin = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    print("\ncProfile of process_series, 1 thread (top 12 by own time):")
    print("\n".join(line for line in lines[begin:] if line.strip()))
    if decode == 0 or render == 0 or write_total == 0 or file_s == 0:
        print("warning: the profile did not find iter_frames/render/SecondaryCaptureSeriesWriter.write/"
              "_write_instance_file: node/ changed?")
    return open_s, plain, phases


def compare_send(outputs: list[Path], work: Path) -> list[tuple[str, float]]:
    """The same derived files into a fresh Orthanc: dcmtk storescu vs the node's DicomSender."""
    from node.deliver.dicom import DicomSender
    from node.net.pynetdicom_setup import configure_pynetdicom

    configure_pynetdicom()  # as dicom-node serve does at start-up

    def with_orthanc(name: str, send) -> tuple[str, float]:
        with OrthancServer(aet="ORTHANC", workdir=work / f"orthanc-{len(results)}") as orthanc:
            bl.sync_disks()
            seconds = send(orthanc)
            stored = orthanc.get("/statistics")["CountInstances"]
            orthanc.stop(grace=0)
        if stored != len(outputs):
            raise RuntimeError(f"{name}: Orthanc has {stored} of {len(outputs)}")
        return name, seconds

    def node_sender(associations: int):
        def send(orthanc) -> float:
            sender = DicomSender(host="127.0.0.1", port=orthanc.dicom_port, called_ae=orthanc.aet,
                                 calling_ae="DICOMNODE", associations=associations)
            started = time.perf_counter()
            sender.send(outputs, study_uid="", series_uid="")
            return time.perf_counter() - started
        return send

    results: list[tuple[str, float]] = []
    for name, send in (
        ("dcmtk storescu (TCP_NODELAY=1)", lambda o: bl.push(o.dicom_port, outputs, called_aet=o.aet)),
        ("node.deliver.dicom.DicomSender, one association (the default)", node_sender(1)),
        ("DicomSender, associations = 2", node_sender(2)),
        ("DicomSender, associations = 4", node_sender(4)),
    ):
        results.append(with_orthanc(name, send))
    return results


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle", type=float, default=2.0, help="node settle_seconds (default 2)")
    parser.add_argument("--associations", type=int, default=1,
                        help="the Orthanc destination's associations setting (default 1)")
    args = parser.parse_args()
    print(f"# end-to-end benchmark\n{bl.machine_info()}")
    files = bl.ct_series(N)
    bl.warm_cache(files)
    with bl.tempdir("e2e-") as work:
        r = run_service(files, work, args.settle, args.associations)
        total = r["done"] - r["acked"]
        pipeline_s = total - args.settle
        print(f"push: {r['push']:.2f} s ({N / r['push']:.0f} images/s); settle {args.settle} s; "
              f"destination associations {args.associations}")
        rows = [
            ("settle + assembler poll (from last ack to queued)", r["queued"] - r["acked"]),
            ("claim + open_images (headers of 300 files)", r["opened"] - r["queued"]),
            ("process_series (node log: outputs in X s)", r["process_s"]),
            ("wait for the delivery loop", (r["delivered"] - r["send_s"]) - r["processed"]),
            ("send to Orthanc (node log: delivered ... in X s)", r["send_s"]),
            ("Orthanc visible after the send (poll 50 ms)", r["done"] - r["delivered"]),
        ]
        after_queue = total - (r["queued"] - r["acked"])
        rows = [(name, sec, "-" if name.startswith("settle") else f"{100 * sec / after_queue:.0f}%")
                for name, sec in rows]
        rows.append(("= last ack -> 300 derived in Orthanc", total, "-"))
        bl.print_table(["phase (node log timestamps, ms resolution)", "seconds", "share after queued"], rows,
                       title="End to end, one run")
        print(f"\nlast ack -> all {N} in Orthanc: {total:.2f} s; minus settle {args.settle} s: {pipeline_s:.2f} s "
              f"=> {N / pipeline_s:.1f} slices/s")

        open_s, plain, phases = profile_processing(r["spool"], r["config"], work)
        plain_s = plain["1 thread"]
        profiled_total = phases["= process_series total (profiled)"]
        print("\nprocess_series in-process, unprofiled: "
              + ", ".join(f"{k} {v:.2f} s ({N / v:.0f} slices/s)" for k, v in plain.items())
              + f"; open_images {open_s:.2f} s")
        bl.print_table(
            ["process_series phase (cProfile, in-process, 1 thread, same spooled series)", "profiled s", "share",
             "est. s unprofiled, 1 thread"],
            [(name, s, f"{100 * s / profiled_total:.0f}%", s / profiled_total * plain_s) for name, s in phases.items()],
        )
        # Shares of the work after settle: processing split by the profile, plus the send.
        work_total = r["process_s"] + r["send_s"]
        scale = r["process_s"] / profiled_total
        decode = phases["decode (pydicom iter_pixels)"] * scale
        render = phases["render (rescale + window + floor)"] * scale
        encode = sum(v for k, v in phases.items() if k.startswith(("SC header", "encode/write"))) * scale
        other = r["process_s"] - decode - render - encode
        bl.print_table(
            ["share of processing + send (node's own timings)", "seconds", "share"],
            [(name, s, f"{100 * s / work_total:.0f}%") for name, s in (
                ("decode", decode), ("processing (render)", render), ("encode/write (SC header, pixels, fsync)", encode),
                ("other inside process_series", other), ("send (C-STORE to Orthanc)", r["send_s"]),
                ("= total", work_total))],
            title="Where the time after settle goes",
        )
        outputs = sorted((work / "plain-1").rglob("*.dcm"))
        sends = compare_send(outputs, work)
        base = sends[0][1]
        bl.print_table(["send the 300 derived SC files to a fresh Orthanc, one association", "seconds",
                        "images/s", "time / storescu"],
                       [(name, sec, N / sec, sec / base) for name, sec in sends],
                       title="Send: the node's C-STORE SCU against dcmtk's, same files, same run")
    print(f"\nat the end: {bl.load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
