"""The ``paddle-meter`` command: serve, models, bill and report.

``serve`` with ``--workers N`` > 1 starts N worker processes that share the ports through
SO_REUSEPORT (each loads its own models, so all cores are used); the parent only forwards
SIGTERM/SIGINT and exits 0 once every worker shut down cleanly.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from auth.cli import add_key_subcommands
from billing.budget_cli import add_budget_subcommands
from billing.budget_store import BudgetStoreError
from billing.cli import add_subcommands
from exporters.ledger import LedgerUnavailable, redact_dsn
from serving.config import WORKER_INDEX_ENV, ConfigError, ledger_url, load_config, pricing_path
from serving.logs import setup_logging

__all__ = ["main"]

log = logging.getLogger("paddle_meter")


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    server: dict[str, Any] = {}
    for option in ("host", "grpc_port", "http_port", "workers"):
        value = getattr(args, option)
        if value is not None:
            server[option] = value
    return {"server": server} if server else {}


def _worker(config: dict[str, Any], index: int = 0) -> None:
    # The worker's stable index (0..N-1): its `worker` label on /metrics (metering_setup.py).
    os.environ[WORKER_INDEX_ENV] = str(index)
    setup_logging(config["logging"]["level"], config["logging"]["format"])
    from serving.app import serve_forever  # heavy imports (paddle) only in workers

    serve_forever(config)


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, _serve_overrides(args))
    setup_logging(config["logging"]["level"], config["logging"]["format"])
    # Refused here, before any worker loads a model: auth off off-loopback, bad TLS files.
    # (Light imports: serving.tls needs grpc and ssl only. Each worker checks again and
    # logs the auth-off warning.)
    from serving.tls import check_exposure, load_tls

    check_exposure(config, warn=False)
    load_tls(config)
    workers = int(config["server"]["workers"])
    if workers <= 1:
        _worker(config)
        return 0
    if 0 in (config["server"]["grpc_port"], config["server"]["http_port"]):
        raise ConfigError("--workers > 1 needs fixed ports: every worker must bind the same ones")
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker, args=(config, i), name=f"worker-{i}") for i in range(workers)
    ]
    for proc in procs:
        proc.start()

    def forward(signum: int, _frame: Any) -> None:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for proc in procs:
        proc.join()
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        log.error("workers exited with errors", extra={"workers": ",".join(failed)})
        return 1
    return 0


def _make_demo_ernie(args: argparse.Namespace) -> int:
    from models.ernie.demo import make_demo_ernie

    print(make_demo_ernie(args.dir))
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from models.onnx_export import export_onnx

    result = export_onnx(args.dir)
    print(f"{result.path} (checked against Paddle Inference: max |diff| {result.max_abs_diff:.2g})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paddle-meter", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the configured models over gRPC and HTTP")
    serve.add_argument("--config", help="YAML file merged over the embedded default")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--grpc-port", dest="grpc_port", type=int)
    serve.add_argument("--http-port", dest="http_port", type=int)
    serve.add_argument("--workers", type=int, help="worker processes sharing the ports")
    serve.set_defaults(func=_serve)

    models = sub.add_parser("models", help="model utilities").add_subparsers(
        dest="models_command", required=True
    )
    demo = models.add_parser(
        "make-demo-ernie", help="export a small UNTRAINED ERNIE for trying the server"
    )
    demo.add_argument("dir")
    demo.set_defaults(func=_make_demo_ernie)
    onnx = models.add_parser(
        "export-onnx",
        help="write DIR/inference.onnx (paddle2onnx) so runtime openvino can serve a PIR "
        "export such as ERNIE's; checked against Paddle Inference",
    )
    onnx.add_argument("dir")
    onnx.set_defaults(func=_export_onnx)

    # Bills and reports read the ledger the server writes: the one of the effective config
    # ($PADDLE_METER_CONFIG merged over the default), unless --ledger names another.
    config = load_config(os.environ.get("PADDLE_METER_CONFIG"))
    add_subcommands(sub, default_ledger=ledger_url(config),
                    trace_url_template=config["billing"]["trace_url_template"],
                    default_timezone=config["billing"]["timezone"])
    add_key_subcommands(sub, config=config)
    add_budget_subcommands(sub, config=config)
    parser.set_defaults(pricing=str(pricing_path(config)))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"paddle-meter: configuration error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, LedgerUnavailable, BudgetStoreError) as exc:
        # a bad period, no ledger, a database that cannot be reached ...
        print(f"paddle-meter: error: {redact_dsn(str(exc))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
