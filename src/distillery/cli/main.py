"""The `distillery` command: one subcommand per stage, plus `run` for all of them.

User mistakes (a bad config, a missing file, a corrupt artifact) end as one line on stderr
and exit code 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import sys

from distillery.compat import environment
from distillery.config import DATA_SOURCES, load_config
from distillery.core import console
from distillery.core.errors import TrainingFailed, UserError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c",
                   help="pipeline YAML (default: the built-in digits preset, as configs/digits.yaml)")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set teacher.train.epochs=5 (repeatable)")
    p.add_argument("--force", action="store_true",
                   help="redo the stages even if their outputs exist and verify")
    p.add_argument("--verbose", "-v", action="store_true", help="also print every epoch, variant and "
                   "load-test phase, and Ray's and Serve's own log lines (always in the run's logs/run.log)")


# `distillery search` flag -> config key (the same as --set search.budget.KEY=VALUE)
BUDGET_FLAGS = {"max_p50_ms": "search.budget.max_p50_ms", "min_throughput": "search.budget.min_throughput",
                "max_size_kib": "search.budget.max_size_kib", "min_accuracy": "search.budget.min_accuracy",
                "maximise": "search.budget.maximise", "as_fast_as": "search.budget.as_fast_as",
                "trials": "search.trials"}


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-p50-ms", type=float,
                   help="batch-1 median latency bound in ms, as a replica runs the model")
    p.add_argument("--as-fast-as", help="no slower at batch 1 than this model of the run (default: student; "
                   "null: no such bound)")
    p.add_argument("--min-throughput", type=float, help="images/s at compress.bench.throughput_batch")
    p.add_argument("--max-size-kib", type=float, help="weights on disk, KiB")
    p.add_argument("--min-accuracy", type=float, help="validation accuracy floor, e.g. 0.985")
    p.add_argument("--maximise", choices=["accuracy", "throughput"],
                   help="what to maximise within the budget")
    p.add_argument("--trials", type=int, help="trials to run (default: search.trials)")


def search_overrides(args: argparse.Namespace) -> list[str]:
    """`distillery search`'s flags as the --set overrides they stand for."""
    return ["search.enabled=true"] + [f"{key}={getattr(args, flag)}" for flag, key in BUDGET_FLAGS.items()
                                      if getattr(args, flag) is not None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distillery", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _stage_commands(sub)
    _serving_commands(sub)
    _loadtest_command(sub)
    _top_command(sub)
    _firewall_command(sub)
    _run_command(sub)
    return parser


def _stage_commands(sub: argparse._SubParsersAction) -> None:
    """One command per stage (or group of stages), each on the run's config."""
    data = sub.add_parser("data", help="dataset commands").add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser("prepare", help="write a dataset as Parquet shards + a data manifest into "
                              "the run directory")
    prepare.add_argument("source", choices=DATA_SOURCES)
    prepare.add_argument("--path", help="cifar10: folder with the *.bin files; parquet: a file or folder; "
                         "folder: <class>/ (or <split>/<class>/) subfolders of images, with --set "
                         "data.image_shape=[C,H,W]")
    _config_args(prepare)

    train = sub.add_parser("train", help="train the teacher, the student alone and the distilled student on "
                           "Ray Train (prepares data first if needed); --model for one of the first two")
    train.add_argument("--model", choices=["teacher", "student_scratch", "all"], default="all",
                       help="student_scratch: the student trained alone, the baseline for distillation")
    _config_args(train)

    distill = sub.add_parser("distill", help="distill the trained teacher into the student on Ray Train")
    _config_args(distill)

    evaluate = sub.add_parser("evaluate", help="reload the trained models from disk, verify and score them")
    _config_args(evaluate)

    compress = sub.add_parser("compress", help="prune and quantize the trained models into variants, measure "
                              "them all, write the frontier report (fine-tuning on Ray Train)")
    _config_args(compress)

    search = sub.add_parser("search", help="a Ray Tune search over distilled students and their "
                            "compression under a budget; the best within it on the validation split "
                            "becomes the variant `searched` (trains the teacher and students first if "
                            "needed; re-running resumes the search)")
    _search_args(search)
    _config_args(search)


def _serving_commands(sub: argparse._SubParsersAction) -> None:
    srv = sub.add_parser("serve", help="serve a run's models on Ray Serve over HTTP (Open Inference "
                         "Protocol); `serve build RUN_DIR -o FILE` writes the Serve config YAML instead; "
                         "`serve env RUN_DIR` prints the environment that gives a Ray started next (e.g. by "
                         "`serve run`) the run's ingress")
    srv.add_argument("words", nargs="+", metavar="[build|env] RUN_DIR",
                     help="a run directory, e.g. runs/digits")
    srv.add_argument("-o", "--output",
                     help="build: where to write the config (default: RUN_DIR/serve/config.yaml)")
    srv.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a serve setting of the run's config, e.g. --set serve.port=8001")
    srv.add_argument("--verbose", "-v", action="store_true",
                     help="also print Ray's and Serve's own log lines (always in RUN_DIR/logs/serve.log)")

    query = sub.add_parser("query", help="send images to a served model and print predictions and latency")
    query.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    query.add_argument("--model", required=True, help="a served model's name, or auto")
    source = query.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="a .npy file of float32 images [N, C, H, W]")
    source.add_argument("--sample", type=int, metavar="N", help="N images from the run's test split")
    query.add_argument("--run-dir", default="runs/digits",
                       help="for --sample: the run's folder or s3:// / gs:// URI (default: %(default)s)")
    query.add_argument("--min-accuracy", type=float, help="auto: a floor, never a model less accurate "
                       "(on the validation split, which chooses; the test split only reports)")
    query.add_argument("--max-latency-ms", type=float, help="auto: this request's own objective (ms, end to "
                       "end in the replica): the most accurate model whose recent p95 is within it")
    query.add_argument("--api-key-env", help="name of an environment variable holding the API key")
    query.add_argument("--verbose", "-v", action="store_true", help="also print the libraries' own log lines")


def _loadtest_command(sub: argparse._SubParsersAction) -> None:
    load = sub.add_parser("loadtest", help="drive served models over HTTP: a concurrency sweep per model and "
                          "an autoscaling ramp; writes loadtest.{json,md,png} and requests.csv")
    load.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    load.add_argument("--run-dir", default="runs/digits", help="the served run, its folder or s3:// / gs:// "
                      "URI: models and validation images to send (default: %(default)s)")
    load.add_argument("--models", help="comma-separated (default: every model the run serves, and auto)")
    load.add_argument("--concurrency", default="1,2,4,8,16,32",
                      help="closed-loop levels ('' skips the sweep; default: %(default)s)")
    load.add_argument("--duration", type=float, default=5.0, help="seconds per level (default: %(default)s)")
    load.add_argument("--adaptive", default="6:0.4,12:1.6,8:0.4", metavar="S:LOAD,...",
                      help="the adaptive scenario, last: seconds at a multiple of the most accurate served "
                      "model's measured capacity, sent to it, to the fastest and to auto ('' skips it; "
                      "default: %(default)s)")
    load.add_argument("--slo-ms", type=float, default=None, help="auto's objective, to judge the adaptive "
                      "scenario by (default: --p99-target-ms)")
    load.add_argument("--ramp", default="5:0.25,25:1.4,40:0.05", metavar="S:LOAD,...",
                      help="open-loop autoscaling ramp, run first: seconds at a multiple of the ramp model's "
                      "measured one-replica capacity, ... ('' skips it; default: %(default)s, long enough at "
                      "the end to see the scale-down after serve.downscale_delay_s)")
    load.add_argument("--ramp-model", help="model for the ramp (default: the slowest served one)")
    load.add_argument("--ramp-images", type=int, default=16,
                      help="images per ramp request (default: %(default)s)")
    load.add_argument("--images", type=int, default=1, help="images per request (default: %(default)s)")
    load.add_argument("--p99-target-ms", type=float, default=100.0,
                      help="p99 target for the sustained rate and the tuning (default: %(default)s)")
    load.add_argument("--tune", action="store_true", help="also try batch sizes and waits per model on "
                      "one replica; write the best under the p99 target to RUN_DIR/serve/tuned.json "
                      "(used by `serve build`)")
    load.add_argument("--out", help="report folder (default: RUN_DIR/serve/loadtest; for a run at a URI, "
                      "./loadtest/NAME, since the bucket holds the run's recorded load test)")
    load.add_argument("--api-key-env", help="name of an environment variable holding the API key")
    load.add_argument("--verbose", "-v", action="store_true", help="also print the report's tables and Ray's "
                      "own log lines (always in the report folder's loadtest.log)")


def _top_command(sub: argparse._SubParsersAction) -> None:
    top = sub.add_parser(
        "top",
        help="a live view of the served models: requests/s, p50/p99, batch size, replicas, "
        "auto's rung, read from the replicas' metrics (Ray's agents, as RUN_DIR/serve/prometheus.yml "
        "names them)",
    )
    top.add_argument(
        "run_dir", nargs="?", default="runs/digits", help="the served run (default: %(default)s)"
    )
    top.add_argument(
        "--targets", help="host:port,... of Ray's metrics agents instead of the run's prometheus.yml"
    )
    top.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default: %(default)s)"
    )
    top.add_argument(
        "--window",
        type=float,
        default=30.0,
        help="seconds a rate is taken over: Ray's agents take new figures every 10 s (default: %(default)s)",
    )
    top.add_argument(
        "--samples", type=int, help="stop after this many refreshes and print the last view as text"
    )


def _firewall_command(sub: argparse._SubParsersAction) -> None:
    wall = sub.add_parser("firewall", help="print the nftables rules a cluster node applies (`distillery "
                          "firewall --nodes CIDR | nft -f -`): from the nodes' range every port, from "
                          "elsewhere only --open")
    wall.add_argument("--nodes", action="append", required=True, metavar="CIDR",
                      help="the cluster's nodes, e.g. the VPC subnet 10.0.0.0/16 (repeatable)")
    wall.add_argument("--open", default="8000,8001", metavar="PORT,...",
                      help="ports anyone may reach: the ingress's HTTP and gRPC (serve.port, "
                      "serve.grpc_port), and Ray's token-protected dashboard (8265) if operators submit jobs "
                      "from elsewhere (default: %(default)s)")


def _run_command(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="the whole pipeline: data, teacher, student alone, distilled student, "
                         "evaluate, compress, serve and load-test, report; then keep serving")
    _config_args(run)
    run.add_argument("--no-keep-serving", dest="keep_serving", action="store_false",
                     help="take the deployment down at the end instead of serving until Ctrl-C (on a "
                     "cluster: instead of leaving it running after the job ends)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.configure(verbose=getattr(args, "verbose", False))
    try:
        _dispatch(args)
    except UserError as e:
        print(f"distillery: error: {e}{_where_logged()}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"distillery: training failed: {e}{_where_logged()}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback in the run's log
        if console.log_file() is None:
            raise
        console.LOGGER.debug("failed", exc_info=True)  # a detail: the run's log, not the console
        print(f"distillery: failed: {type(e).__name__}: {e}{_where_logged()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("distillery: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


def _where_logged() -> str:
    path = console.log_file()
    return f" (full log: {path})" if path else ""


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "firewall":
        from distillery.serving import firewall

        return print(firewall.rules(args.nodes, firewall.parse_ports(args.open)), end="")
    if args.command in ("serve", "query", "loadtest", "top"):
        from distillery.cli import serve as serve_cli

        commands = {"serve": serve_cli.serve, "query": serve_cli.query, "loadtest": serve_cli.loadtest,
                    "top": serve_cli.top}
        return commands[args.command](args)
    # Imported here so `distillery --help` stays fast (torch is slow to import).
    from distillery.pipeline.stages import before_student, require_done, run_stages

    overrides = list(args.overrides)
    if args.command == "data":
        overrides += [f"data.source={args.source}"] + ([f"data.path={args.path}"] if args.path else [])
    if args.command == "search":
        overrides += search_overrides(args)
    cfg = load_config(args.config, overrides)
    environment.ask_for_token_auth(cfg.ray.address)
    log = console.say
    if args.command == "data":
        stages = ["data"]
    elif args.command == "train":
        models = list(cfg.trained) if args.model == "all" else [args.model]
        if args.model not in ("all", *cfg.trained):
            raise UserError(f"--model {args.model}: this config trains no {args.model} (distill.baseline: "
                            "false); set distill.baseline=true to train it")
        stages = ["data"] + [s for m in models for s in (before_student(cfg) if m == "student" else []) + [m]]
    elif args.command == "distill":
        require_done(cfg, ["data", "teacher"])
        stages = before_student(cfg) + ["student"]
    elif args.command == "evaluate":
        require_done(cfg, ["data", *cfg.trained])
        stages = ["evaluate"]
    elif args.command == "search":
        stages = ["data", *cfg.trained, "search"]
    elif args.command == "compress":
        require_done(cfg, ["data", *cfg.trained])
        stages = ["compress"]
    else:
        stages = None
    run = run_stages(cfg, stages, force=args.force, log=log)
    log(f"run directory: {run.describe()}")
    if (run.root / "results.md").exists() and args.command in ("run", "evaluate"):
        log(f"results: {(run.root / 'results.md').resolve()}")
    if (run.root / "frontier.md").exists() and args.command in ("run", "compress"):
        log(f"frontier: {(run.root / 'frontier.md').resolve()}")
    if (run.root / "search" / "frontier.md").exists() and args.command in ("run", "search"):
        log(f"search: {(run.root / 'search' / 'frontier.md').resolve()}")
    if args.command == "run":
        log(f"report: {(run.root / 'report.md').resolve()}")
        if cfg.serve.enabled:
            from distillery.serving.launch import after_run  # Ray Serve loads only when serving

            after_run(run, cfg, args.keep_serving, log)


if __name__ == "__main__":
    sys.exit(main())
