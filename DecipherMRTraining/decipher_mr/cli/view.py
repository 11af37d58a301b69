"""Open the DecipherMR viewer in a web browser: Slicer's scene and views (trame-slicer) with the
DecipherMR panel: segment, anomaly overlay with opacity, text query -> highlight and jump, reports
like this volume, case search, open a retrieved case.

It serves on localhost only unless --host says otherwise. On a remote GPU server, forward the port:
  ssh -L 8080:localhost:8080 gpu-server   then open http://localhost:8080 on your own machine.
The panel is the Slicer module's own logic (DecipherMRLib) on the viewer's scene, and the model runs in
the same `decipher-mr worker` process the module uses.

example:
  decipher-mr view --bundle demo/bundle.zip --index demo/index --volume demo/data/images/brain-000.nii.gz
  decipher-mr view --port 9000          (choose the bundle and open volumes in the page)
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", help="model bundle (folder or .zip); can also be chosen in the page")
    parser.add_argument("--index", help="retrieval index folder (from `decipher-mr index build`) for reports and cases")
    parser.add_argument("--volume", help="image file (NIfTI, NRRD, MHA) or DICOM series folder to open at start")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080; 0 picks a free one)")
    parser.add_argument("--host", default="localhost",
                        help="interface to listen on (default localhost; 0.0.0.0 exposes the viewer to your network)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] for the model")
    parser.add_argument("--engine", default="worker", choices=("worker", "in-process"),
                        help="run the model in the persistent worker process (default, as in Slicer) or in this process")
    parser.add_argument("--encoder", default="turbo-jpeg", choices=("turbo-jpeg", "jpeg", "png", "webp"),
                        help="how rendered views are sent to the page (png is lossless and larger)")
    parser.add_argument("--open", action="store_true", help="open the page in this machine's web browser")
    parser.add_argument("--idle-exit", type=int, default=0, metavar="SECONDS",
                        help="stop the server after this long with no page connected (default 0: never)")


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    for what, value in (("--bundle", args.bundle), ("--index", args.index), ("--volume", args.volume)):
        if value and not Path(value).expanduser().exists():
            print(f"decipher-mr view: {what} {value}: no such file or folder", file=sys.stderr)
            return 2
    try:
        from decipher_mr.viewer.app import ViewerApp
    except ImportError as exc:
        print(f"decipher-mr view: the viewer needs trame-slicer and slicer-core ({exc}); run `make setup`", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = ViewerApp(bundle=args.bundle, index=args.index, device=args.device, volume=args.volume,
                    engine=args.engine, encoder=args.encoder)

    def announce(**_):
        port = app.server.port
        print(f"DecipherMR viewer: http://{'localhost' if args.host in ('localhost', '127.0.0.1') else args.host}:{port}/",
              flush=True)
        print("  (Ctrl+C stops it. Research use only, not for clinical decisions.)", flush=True)

    app.server.controller.on_server_ready.add(announce)
    try:
        app.server.start(port=args.port, host=args.host, open_browser=args.open, show_connection_info=False,
                         disable_logging=True, timeout=max(0, args.idle_exit))
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0
