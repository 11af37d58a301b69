"""Open the DecipherMR viewer in a web browser: Slicer's scene and views (trame-slicer) with the
DecipherMR panel: segment, anomaly overlay with opacity, text query -> highlight and jump, reports
like this volume, case search, open a retrieved case.

It serves on localhost only unless --host says otherwise, and only to whoever has its token: a random
secret made at start (or $DECIPHER_MR_VIEWER_TOKEN, or --token), printed once in the address to open:
  http://localhost:8080/?secret=...
On a remote GPU server, forward the port (ssh -L 8080:localhost:8080 gpu-server) and open that address on
your own machine. Paths typed in the page must be inside the data roots (--data-root, repeatable; by
default the folders of --volume, --bundle, --index and the current folder); uploads are limited in size.
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
    parser.add_argument("--engine", default="worker", metavar="worker|in-process|USER@HOST",
                        help="run the model in the persistent worker process (default, as in Slicer), in this process, "
                             "or on a GPU server through ssh (USER@HOST[:PORT]; --bundle and --index are then paths "
                             "on the server)")
    remote = parser.add_argument_group("remote engine (--engine USER@HOST)")
    remote.add_argument("--ssh-port", type=int, default=None, help="the server's ssh port (default: 22 or your ssh config)")
    remote.add_argument("--ssh-key", default=None, help="private key file (default: your ssh agent and config)")
    remote.add_argument("--ssh-config", default=None, metavar="FILE", help="an ssh configuration file (ssh -F; default: yours)")
    remote.add_argument("--remote-command", default=None,
                        help="how the server runs the engine (default: decipher-mr on its PATH)")
    parser.add_argument("--encoder", default="turbo-jpeg", choices=("turbo-jpeg", "jpeg", "png", "webp"),
                        help="how rendered views are sent to the page (png is lossless and larger)")
    parser.add_argument("--open", action="store_true", help="open the page in this machine's web browser")
    parser.add_argument("--idle-exit", type=int, default=0, metavar="SECONDS",
                        help="stop the server after this long with no page connected (default 0: never)")
    access = parser.add_argument_group("access")
    access.add_argument("--token", help="the access token (default: $DECIPHER_MR_VIEWER_TOKEN, else a new random one); "
                        "a token on the command line is visible to other users in the process list: prefer the variable")
    access.add_argument("--no-token", action="store_true",
                        help="no token: anyone who reaches the port gets in (a single-user laptop only; refused with --host "
                             "other than localhost)")
    access.add_argument("--data-root", action="append", metavar="FOLDER",
                        help="a folder whose files the page may open by path (repeatable; default: the folders of "
                             "--volume, --bundle, --index and the current folder)")
    access.add_argument("--max-upload-mb", type=float, default=None, metavar="MB",
                        help="largest upload from the page, all files together (default 2048)")


LOOPBACK = ("localhost", "127.0.0.1", "::1", "ip6-localhost")


def data_roots(args: argparse.Namespace) -> list:
    """--data-root folders plus the exact paths given on the command line; by default the folders of
    those paths and the current folder."""
    from pathlib import Path

    given = [Path(p).expanduser().resolve() for p in (args.volume, args.bundle, args.index) if p]
    if args.data_root:
        return [Path(p).expanduser().resolve() for p in args.data_root] + given
    return [Path.cwd().resolve(), *(p.parent for p in given)]


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    target = None
    if args.engine not in ("worker", "in-process"):
        from decipher_mr.inference.transport import EngineTarget

        try:
            target = EngineTarget.parse(args.engine, port=args.ssh_port, identity=args.ssh_key,
                                        remote_command=args.remote_command, ssh_config=args.ssh_config)
        except ValueError as exc:
            print(f"decipher-mr view: --engine: {exc}", file=sys.stderr)
            return 2
    remote_paths = ("--bundle", "--index") if target is not None else ()
    for what, value in (("--bundle", args.bundle), ("--index", args.index), ("--volume", args.volume)):
        if value and what not in remote_paths and not Path(value).expanduser().exists():
            print(f"decipher-mr view: {what} {value}: no such file or folder", file=sys.stderr)
            return 2
    for root in args.data_root or []:
        if not Path(root).expanduser().is_dir():
            print(f"decipher-mr view: --data-root {root}: no such folder", file=sys.stderr)
            return 2
    loopback = args.host in LOOPBACK
    if args.no_token and not loopback:
        print(f"decipher-mr view: --host {args.host} exposes the viewer beyond this machine; it needs the token "
              "(leave out --no-token)", file=sys.stderr)
        return 2
    from decipher_mr.viewer.access import DEFAULT_MAX_UPLOAD_MB, resolve_token

    try:
        token = resolve_token(args.token, no_token=args.no_token)
    except ValueError as exc:
        print(f"decipher-mr view: {exc}", file=sys.stderr)
        return 2
    max_upload_mb = DEFAULT_MAX_UPLOAD_MB if args.max_upload_mb is None else args.max_upload_mb
    if max_upload_mb <= 0:
        print("decipher-mr view: --max-upload-mb must be positive", file=sys.stderr)
        return 2
    roots = data_roots(args)
    try:
        from decipher_mr.viewer.app import ViewerApp
    except ImportError as exc:
        print(f"decipher-mr view: the viewer needs trame-slicer and slicer-core ({exc}); run `make setup`", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").disabled = True  # request lines carry ?secret=: never log them
    if args.no_token:
        print("decipher-mr view: WARNING: --no-token: anyone who can reach this port (every user of this machine) "
              "can open the viewer, read the files under the data roots and the indexed reports", file=sys.stderr)
    app = ViewerApp(bundle=args.bundle, index=args.index, device=args.device, volume=args.volume,
                    engine=target if target is not None else args.engine, encoder=args.encoder, token=token, data_roots=roots,
                    max_upload_bytes=int(max_upload_mb * 2**20))

    def announce(**_):
        port = app.server.port
        host = "localhost" if loopback else args.host
        query = f"?secret={token}" if token else ""
        # the only place the token is ever written
        print(f"DecipherMR viewer: http://{host}:{port}/{query}", flush=True)
        if not loopback:
            print(f"  Listening on {args.host}:{port}: anyone who can reach this machine on that port can try; with the "
                  "token they can open any file under: " + ", ".join(str(r) for r in roots), flush=True)
        else:
            print("  Data roots (files the page may open by path): " + ", ".join(str(r) for r in roots), flush=True)
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
