"""Rankwright's web UI: ``python app.py`` serves it on http://127.0.0.1:7860.

Options: ``--host`` (default 127.0.0.1; 0.0.0.0 to serve the network — then use ``--auth``), ``--port`` (7860),
``--auth user:pass``, ``--workspace DIR`` (default ./workspace: datasets, outputs, presets and jobs live there),
``--data-dir DIR`` (repeatable: a dataset folder outside the workspace the UI may open, caption and train on).
Training runs in a worker process; Ctrl+C here also asks a running job to save and stop.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python app.py", description="Rankwright web UI")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--auth", default=None, metavar="USER:PASS", help="require this login")
    parser.add_argument("--workspace", default="workspace", metavar="DIR",
                        help="folder for datasets, outputs, presets and jobs (default ./workspace)")
    parser.add_argument("--data-dir", action="append", default=[], metavar="DIR",
                        help="also let the UI open, caption and train on datasets in DIR (repeatable); only the "
                             "workspace's datasets/ otherwise")
    args = parser.parse_args(argv)
    for folder in args.data_dir:
        if not os.path.isdir(os.path.expanduser(folder)):
            parser.error(f"--data-dir {folder}: no such folder")
    if args.auth is not None:
        user, _, password = args.auth.partition(":")
        if not user or not password:
            parser.error("--auth must be USER:PASS (both non-empty)")
        args.auth = (user, password)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1-65535, got {args.port}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*SOCKS support")  # urllib3's note about an optional extra
    from ui.server import describe_address, launch
    from ui.workspace import Workspace

    ws = Workspace(args.workspace, data_dirs=args.data_dir)
    try:
        demo, _ = launch(ws, host=args.host, port=args.port, auth=args.auth)
    except OSError as error:
        print(f"error: cannot serve on {args.host}:{args.port} ({error})", file=sys.stderr)
        return 2
    message, warning = describe_address(args.host, args.port, args.auth is not None, str(ws.root))
    print(message, flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
