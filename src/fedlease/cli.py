"""Command line: ``fedlease run`` (one federated training), ``fedlease compare`` (several methods, one table),
``fedlease predict``, ``generate`` and ``export`` (using a trained client) and ``fedlease tasks`` (the task registry).

The flags of ``run`` and ``compare`` are generated from :class:`fedlease.config.RunConfig`. Every bad input
ends the program with one line, ``fedlease: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from collections.abc import Sequence

from fedlease.config import METHOD_NAMES, RunConfig, field_type
from fedlease.errors import ConfigError, FedleaseError


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print only the error, on one line."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"fedlease: error: {message.splitlines()[0]} (see '{self.prog} --help')\n")


def add_config_arguments(parser: argparse.ArgumentParser, exclude: Sequence[str] = (),
                         suppress_defaults: bool = False) -> None:
    """One flag per RunConfig field, spelled as the field, with its default and help. With
    ``suppress_defaults`` a flag that is not given is absent from the parsed namespace."""
    defaults = RunConfig()
    for field in dataclasses.fields(RunConfig):
        if field.name in exclude:
            continue
        meta = dict(field.metadata)
        default = getattr(defaults, field.name)
        help_text = meta.pop("help")
        kind = field_type(field.name)
        if suppress_defaults:
            default = argparse.SUPPRESS
        if kind is bool:
            parser.add_argument(f"--{field.name}", action="store_true", help=help_text,
                                **({"default": default} if suppress_defaults else {}))
            continue
        if default not in (None, argparse.SUPPRESS) and "nargs" not in meta:
            help_text += f" (default: {default})"
        parser.add_argument(f"--{field.name}", type=kind, default=default, help=help_text, **meta)


NEWCOMER = "; new: a client that was not in the run, placed by its own --data"


def add_client_arguments(parser: argparse.ArgumentParser, more: str) -> None:
    """The run folder and the client that ``predict`` and ``export`` use."""
    parser.add_argument("run", metavar="RUN", help="the run's output directory")
    parser.add_argument("--client", required=True, help=f"the client id (0 .. clients-1){more}")


def add_newcomer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--client new``: a newcomer's own examples, which choose its model here (``fedlease.use.newcomer``)."""
    parser.add_argument("--data", default=None,
                        help="with --client new: the newcomer's own examples, JSON lines: text, text_pair for a "
                             "pair task, label (a classification run); instruction, optional input, output (an "
                             "instruction run). They choose its model here; nothing leaves")
    parser.add_argument("--task", default=None, help="with --client new: the newcomer's task (when the run has "
                                                     "several)")


def add_source_arguments(parser: argparse.ArgumentParser, input_help: str, metric: str) -> None:
    """What ``predict`` and ``generate`` read: the user's file, or the client's own split."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help=f"{input_help}; - reads stdin")
    source.add_argument("--split", choices=("test", "train"),
                        help=f"the client's own split, rebuilt from the run's configuration (its data must be where "
                             f"the run read it); test reproduces the {metric} the run recorded")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where ``predict`` and ``generate`` write, and how they run."""
    parser.add_argument("--output", default=None, help="where to write the JSON lines (default: stdout)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="inputs per forward pass (default: the run's --eval_batch_size)")
    parser.add_argument("--no_progress", action="store_true", help="do not show a progress bar")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    names = {f.name for f in dataclasses.fields(RunConfig)}
    return RunConfig(**{key: value for key, value in vars(args).items() if key in names})


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fedlease", description="FedLEASE federated LoRA fine-tuning and its baselines.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    run = sub.add_parser("run", help="run one federated training and write its artifacts",
                         description="Run one federated training (FedLEASE by default) and write the log, "
                                     "metrics, plots and final weights to --output_dir. A checkpoint is saved "
                                     "after every round; --resume continues a stopped run.")
    add_config_arguments(run, suppress_defaults=suppress_defaults)
    run.add_argument("--resume", metavar="OUTPUT_DIR", default=None,
                     help="continue the run in OUTPUT_DIR from its last complete round (its settings are reused; "
                          "flags given again must match them)")
    run.add_argument("--no_progress", action="store_true", help="do not show progress bars")
    compare = sub.add_parser(
        "compare", help="run several methods on identical partitions and seeds and tabulate them",
        description="Run several methods (each with every seed) on identical partitions and write "
                    "comparison.md / .csv / .png plus each run's own directory under --output_dir. A method "
                    "spec may carry settings of its own: fedit:rank=16, fedlease:num_experts=16, "
                    "fedlease:top_k=2.")
    compare.add_argument("--methods", nargs="+", default=list(METHOD_NAMES),
                         help=f"method specs (default: {' '.join(METHOD_NAMES)})")
    compare.add_argument("--seeds", nargs="+", type=int, default=[RunConfig().seed],
                         help="seeds; each method runs once per seed (default: 42)")
    add_config_arguments(compare, exclude=("method", "seed"))
    compare.add_argument("--resume", action="store_true",
                         help="continue a stopped comparison in --output_dir (same flags): finished runs are "
                              "kept, a run with a checkpoint continues from it, the others start again")
    compare.add_argument("--no_progress", action="store_true", help="do not show progress bars")
    deploy = sub.add_parser(
        "deploy", help="run on Flower: a SuperLink and one SuperNode per client on loopback",
        description="Start a Flower SuperLink and one SuperNode per client on 127.0.0.1 (TLS with --tls), "
                    "submit the run with flwr run, stream its log, and stop everything afterwards. Same flags "
                    "and artifacts as fedlease run.")
    add_config_arguments(deploy)
    deploy.add_argument("--tls", action="store_true", help="TLS between SuperNodes and SuperLink, with a "
                                                           "throw-away CA generated in the work directory")
    deploy.add_argument("--workdir", default=None, help="where logs, certificates, Flower homes and the "
                                                        "clients' own state go (default: <output_dir>/flower)")
    deploy.add_argument("--executor", choices=("fedlease", "flower"), default="fedlease",
                        help="fedlease (default): one long-lived process per SuperNode runs its ClientApp, so "
                             "the model is loaded once per node; flower: Flower's own executor, a new process "
                             "(and model load) per message")
    deploy.add_argument("--secure_aggregation", action="store_true",
                        help="Flower's SecAgg+ for every aggregate that is a sum over a known group of clients: the "
                             "server learns each group's sum, never a client's upload (FedLEASE's warmup still "
                             "travels in the clear; at least 3 clients a round; docs/deployment.md)")
    executor = sub.add_parser(
        "executor", help="run a SuperNode's ClientApp tasks in one long-lived process (model loaded once)",
        description="Serve the ClientApp tasks of one SuperNode started with --isolation process, in this "
                    "process, so the model is loaded once per node and run. Start it next to the SuperNode, "
                    "in place of flower-superexec.")
    executor.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                          help="the SuperNode's Runtime API (its --host:--port; default 127.0.0.1:9094)")
    executor.add_argument("--root-certificates", default=None,
                          help="CA certificate of the SuperNode's Runtime API when it uses TLS (--ssl-*); "
                               "plain HTTP on the node's own loopback otherwise")
    executor.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) ends")
    predict = sub.add_parser(
        "predict", help="classify texts with a trained client of a finished run",
        description="Classify texts with client ID of the finished run in RUN (a classification run), rebuilt from "
                    "its final file. Writes one JSON line per input: label, probabilities (and reference, with "
                    "--split).")
    add_client_arguments(predict, NEWCOMER)
    add_source_arguments(predict, "JSON lines with \"text\" (and \"text_pair\" for a pair task), or a plain text "
                                  "file, one text a line", "accuracy")
    add_newcomer_arguments(predict)
    add_output_arguments(predict)
    generate = sub.add_parser(
        "generate", help="answer prompts with a trained client of a finished instruction run",
        description="Answer prompts with client ID of the finished instruction run in RUN, rebuilt from its final "
                    "file (or, with --client new --data FILE, what its method gives a newcomer), in the prompt "
                    "template the run trained with (greedy). Writes one JSON line per prompt: response (and "
                    "reference, with --split).")
    add_client_arguments(generate, NEWCOMER)
    add_source_arguments(generate, "JSON lines with \"instruction\" and optionally \"input\"", "ROUGE")
    add_newcomer_arguments(generate)
    generate.add_argument("--max_new_tokens", type=int, default=None,
                          help="the longest response in tokens (default: the run's --max_new_tokens)")
    add_output_arguments(generate)
    export = sub.add_parser(
        "export", help="export a trained client as PEFT LoRA adapters with a model card",
        description="Write client ID of the finished run in RUN (or, with --client new --data FILE, what its "
                    "method gives a newcomer) as standard PEFT LoRA adapter folders (one per expert; a single "
                    "adapter with its head as modules_to_save where the model allows), the router and head beside "
                    "them, fedlease_client.json and a model card (README.md, with the data's sources and "
                    "licences).")
    add_client_arguments(export, NEWCOMER)
    add_newcomer_arguments(export)
    export.add_argument("--device", default="auto", help="with --client new: where the newcomer's model is chosen "
                                                         "(auto, cpu or cuda; default: auto)")
    export.add_argument("--format", default="peft", help="the export format (default and only one: peft)")
    export.add_argument("--out", required=True, help="the folder to write (must not exist, or --overwrite)")
    export.add_argument("--merge", action="store_true",
                        help="also write merged/: the model with the adapter merged in (single-adapter clients)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    tasks = sub.add_parser("tasks", help="list the tasks this installation knows")
    tasks.add_argument("--data_dir", default=None, help="also the task folders of this --data_dir")
    tasks.add_argument("--instruction_dir", default=None, help="also the categories of this --instruction_dir")
    return parser


def log_to_console(level: int = logging.INFO) -> None:
    """fedlease's log on this call's stderr (replacing the handler an earlier main() in this process left)."""
    from fedlease.runtime.simulation import CONSOLE

    logger = logging.getLogger("fedlease")
    logger.setLevel(level)
    logger.propagate = False
    for old in [h for h in logger.handlers if getattr(h, "fedlease_console", False)]:
        logger.removeHandler(old)  # main() may be called more than once in a process
    handler = logging.StreamHandler(sys.stderr)
    handler.fedlease_console = True
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(lambda record: getattr(record, CONSOLE, True))
    logger.addHandler(handler)


def list_tasks() -> str:
    from fedlease.data.tasks import TASKS

    rows = [f"{'task':22s} {'kind':14s} {'source':12s} {'labels':>6s}  description"]
    rows += [f"{s.name:22s} {s.kind:14s} {s.source:12s} {s.num_labels or '-':>6}  {s.description}"
             for s in TASKS.values()]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a flag error already printed on one line
        return int(exc.code or 0)
    try:
        if args.command == "tasks":
            from fedlease.runtime.clients import register_user_tasks

            register_user_tasks(RunConfig(data_dir=args.data_dir, instruction_dir=args.instruction_dir))
            print(list_tasks())
            return 0
        if args.command in ("predict", "generate", "export"):
            from fedlease.use import commands

            log_to_console(logging.WARNING)  # the output is the answers; only what went wrong is logged

            if args.command == "generate":
                summary = commands.generate(args.run, args.client, input=args.input, split=args.split,
                                            output=args.output, device=args.device, batch_size=args.batch_size,
                                            progress=not args.no_progress, max_new_tokens=args.max_new_tokens,
                                            data=args.data, task=args.task)
            elif args.command == "predict":
                summary = commands.predict(args.run, args.client, input=args.input, split=args.split,
                                           output=args.output, device=args.device, batch_size=args.batch_size,
                                           progress=not args.no_progress, data=args.data, task=args.task)
            else:
                summary = commands.export_client(args.run, args.client, out=args.out, fmt=args.format,
                                                 merge=args.merge, overwrite=args.overwrite, data=args.data,
                                                 task=args.task, device=args.device)
            print(summary, file=sys.stderr)
            return 0
        log_to_console()
        if args.command == "executor":
            from fedlease.runtime.flower.executor import serve

            serve(args.runtime_api_address, insecure=args.root_certificates is None,
                  root_certificates=args.root_certificates, parent_pid=args.parent_pid)
            return 0
        if args.command == "deploy":
            from pathlib import Path

            from fedlease.runtime.flower.deploy import deploy

            base = config_from_args(args)
            workdir = Path(args.workdir) if args.workdir else Path(base.output_dir).expanduser() / "flower"
            out = deploy(base, workdir, tls=args.tls, executor=args.executor,
                         secure_aggregation=args.secure_aggregation)
            print((out / "results.md").read_text(encoding="utf-8"))
            print(f"artifacts: {out}")
            return 0
        if args.command == "compare":
            from fedlease.compare import compare

            base = config_from_args(args)
            print(compare(base, args.methods, args.seeds, progress=not args.no_progress, resume=args.resume))
            print(f"artifacts: {base.output_dir}")
            return 0
        from fedlease.runtime.simulation import resume_config, run

        if args.resume is not None:
            explicit = {k: v for k, v in vars(build_parser(suppress_defaults=True).parse_args(argv)).items()
                        if k not in ("command", "resume", "no_progress")}
            if explicit.get("output_dir", args.resume) != args.resume:
                raise ConfigError("--resume names the output directory; do not pass a different --output_dir")
            if explicit.get("overwrite"):
                raise ConfigError("--resume continues a run and --overwrite replaces it: pass one of them")
            result = run(resume_config(args.resume, explicit), progress=not args.no_progress, resume=True)
        else:
            result = run(config_from_args(args), progress=not args.no_progress)
        print(result.table)
        print(f"artifacts: {result.output_dir}")
        return 0
    except FedleaseError as exc:
        print(f"fedlease: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlease: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
