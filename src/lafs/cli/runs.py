"""``lafs experiment``, ``lafs demo``, ``lafs bench`` and ``lafs toy-affine``: the commands that run whole studies
(their work lives beside this module: ``experiment.py``, ``demo.py``, ``bench.py``, ``toy_affine.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_toy_affine(args: argparse.Namespace) -> int:
    from .toy_affine import main as toy_main  # imported here: torch and OpenCV stay out of `lafs --help`

    return toy_main(args.toy_args)


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from .bench import bench_kprpe, format_kprpe

    result = bench_kprpe(args.size, args.batch, args.rounds, args.warmup, args.threads, args.device, amp=args.amp,
                         compile=args.compile)
    print(format_kprpe(result))
    if args.json:
        from ..io import atomic_write_bytes

        atomic_write_bytes(Path(args.json), json.dumps(result, indent=2).encode())
        print(f"wrote {args.json}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    """Run a grid (a packaged experiments/NAME.yaml or a grid file; what is not done yet), then write its tables."""
    from . import experiment as ex

    grid = ex.load_grid(ex.find_grid(args.name))
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    budget = args.budget if args.budget is not None else float(grid["budget"])
    root = Path(args.out or f"runs/experiments/budget-{budget:g}min")
    runs = ex.expand(grid, root, seeds, budget)
    if args.list:
        # with --restore, what the archive would put back (nothing is written: --list runs nothing)
        makers = ex.file_makers(runs)
        archived = {r.name for r in runs if args.restore and r.name not in makers
                    and (Path(args.restore) / r.name / "done.json").is_file()}
        for r in runs:
            done = (root / r.name / "done.json").is_file()
            state = "done" if done else "archived" if r.name in archived else "todo"
            print(f"{state:8s}  {r.name}: lafs {' '.join(r.argv)}"
                  + (f"  [{r.budget:g} min]" if r.budget is not None else "")
                  + (f"  [{r.steps} steps]" if r.steps is not None else ""))
        return 0
    if args.restore:
        restored = ex.restore(runs, args.restore, root)
        makers = sorted(ex.file_makers(runs))
        print(f"restored the records of {len(restored)} done runs from {args.restore} into {root}"
              + (f"; {len(makers)} runs whose files other runs read are made again when needed (an archive keeps "
                 f"no files): {', '.join(makers[:3])}{' ...' if len(makers) > 3 else ''}" if makers else ""))
    status = {"failed": {}}
    if not args.aggregate:
        print(f"lafs experiment {grid['name']}: {len(runs)} runs in {root}, training budget {budget:g} min per run "
              f"(x the stage's factor)")
        status = ex.run_grid(runs, root, only=args.only)
        print(f"{len(status['ran'])} ran, {len(status['done'])} already done, {len(status['failed'])} failed, "
              f"{len(status['skipped'])} skipped")
    command = (f"lafs experiment {grid['name']} --budget {budget:g}" + (f" --seeds {args.seeds}" if args.seeds else "")
               + (f" --out {args.out}" if args.out else ""))
    _, md = ex.report(grid, runs, root, command)
    print(md)
    name = grid["name"]
    print(f"wrote {root / f'results_{name}.md'} (+ .json)")
    if args.results:
        print(f"updated {ex.update_section(args.results, grid['name'], md)}")
    if args.archive:
        print(f"archived the records of {len(ex.archive(runs, root, args.archive))} done runs in {args.archive}")
    return 1 if status["failed"] else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_summary, run_demo

    lfw = False if args.no_lfw else args.lfw
    summary = run_demo(args.out, args.budget_minutes, lfw, args.dino, args.shots, args.seed, progress=not args.quiet,
                       real=args.real, data=args.data)
    print(format_summary(summary))
    print(f"run folder: {args.out} (one folder per stage with config.yaml, metrics.jsonl, tb/, checkpoints/ and "
          "MODEL_CARD.md; demo.json, roc.png, landmarks.png, attention.png)")
    return 0



def register(sub) -> None:
    """Add ``experiment``, ``demo``, ``toy-affine`` and ``bench`` to the ``lafs`` subcommands."""
    p = sub.add_parser("experiment", help="run a declarative grid (experiments/NAME.yaml: fewshot, lafs-ablation, "
                       "kprpe-robustness) of ordinary runs over seeds, skipping finished runs, and tabulate it")
    p.add_argument("name", help="grid name (a packaged preset, or experiments/NAME.yaml of the working folder) or "
                   "a grid .yaml file")
    p.add_argument("--budget", type=float, help="training minutes per run, the same for every arm (default: the grid's)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the grid's, 0,1,2)")
    p.add_argument("--out", help="root folder of the runs (default: runs/experiments/budget-<budget>min, shared by "
                   "the grids: identical runs are made once)")
    p.add_argument("--only", action="append", metavar="GLOB", help="run only matching run names (+ what they need)")
    p.add_argument("--list", action="store_true", help="list the runs and their state; run nothing")
    p.add_argument("--aggregate", action="store_true", help="only write the tables from the run folders")
    p.add_argument("--results", metavar="FILE.md", help="also replace this grid's section of FILE.md (docs/results.md)")
    p.add_argument("--archive", metavar="DIR", help="then copy every done run's records (done.json, eval.json, "
                   "summary.json, config.yaml; no checkpoints) to DIR/<run>/: a grid's finished seeds outlast the "
                   "machine (`--aggregate --out DIR` tabulates them)")
    p.add_argument("--restore", metavar="DIR", help="first put the records of an --archive DIR into the root: those "
                   "runs count as done")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("demo", help="the LAFS story on synthetic faces: stage 1, LAFS (+ DINO) pretraining, "
                       "few-shot finetune vs scratch, a table and pictures")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="training minutes, shared out between the stages (default 6 on synthetic faces, 22 with "
                   "--real; the whole run takes a little longer: data, evaluation, floors and pictures)")
    p.add_argument("--real", action="store_true",
                   help="the same story on real faces: CelebA-64 (train/celeba64_train.rec, celeba64/celeba64_val.bin "
                   "under --data) and LFW, with floors")
    p.add_argument("--data", help="--real: the folder holding train/celeba64_train.rec and celeba64/celeba64_val.bin "
                   "(default ../shared/data)")
    p.add_argument("--lfw", help="also evaluate on this lfw.bin (default: ../shared/data/lfw/lfw.bin if present)")
    p.add_argument("--no-lfw", action="store_true", help="no LFW evaluation")
    p.add_argument("--dino", action=argparse.BooleanOptionalAction, default=None,
                   help="include the DINO arm (default: when the budget is at least 6 minutes)")
    p.add_argument("--shots", type=int, default=2, help="labelled images per identity in the finetune")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    # its options belong to lafs.cli.toy_affine (see `lafs toy-affine --help`); main() hands them over unparsed
    p = sub.add_parser("toy-affine", add_help=False, help="KP-RPE (Kim et al., CVPR 2024) Fig. 1 toy: digits -> "
                       "affine digits, Abs-PE / RPE / iRPE / KP-RPE (extra toy; options: lafs toy-affine --help)")
    p.set_defaults(func=cmd_toy_affine, toy_args=[])

    bench = sub.add_parser("bench", help="measured cost tables (kprpe: ViT vs iRPE vs KP-RPE, as Kim et al., "
                           "CVPR 2024, Table 3)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    p = bench_sub.add_parser("kprpe", help="params, GFLOPs, eval and train throughput, measured side by side")
    p.add_argument("--size", default="small", choices=("micro", "small", "base"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each times every model once, interleaved)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=("none", "bf16"),
                   help="autocast precision of the timed steps (bf16: weights and AdamW in fp32, as train.amp=bf16)")
    p.add_argument("--compile", action="store_true",
                   help="time every arm through torch.compile (inductor), as train.compile=true; warm-up compiles")
    p.add_argument("--json", help="write the measurements here")
    p.set_defaults(func=cmd_bench)
