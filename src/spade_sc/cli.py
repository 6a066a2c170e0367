"""Command line of spade_sc: ``spade-sc demo | features | fit | embed | slides | mil | evaluate``.

Every subcommand but ``demo`` works over a manifest (a CSV with ``slide_id``, ``path``, optional ``format`` and
slide-level label columns), writes its outputs atomically, skips what an earlier run with the same parameters
finished, lists failing slides in ``failures.csv`` and records the run in ``run.json``. Exit codes: 0 all done,
1 some slide failed, 2 a user error (one line, nothing written).
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import _commands
from ._cohort import UserError
from ._demo import demo

logger = logging.getLogger("spade_sc")

_MANIFEST = (
    "CSV with columns slide_id, path (a .zarr, a slide file, a Space Ranger folder, a HEST id), optional format and "
    "image (Visium: the full-resolution H&E; default: the one image file in the folder); other columns are labels"
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        msg = f"must be a positive integer, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        msg = f"must be a positive number, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _experts(text: str) -> str | int:
    return text if text == "auto" else _positive_int(text)


def _common(p: argparse.ArgumentParser, *, manifest: bool = True) -> None:
    if manifest:
        p.add_argument("manifest", help=_MANIFEST)
        p.add_argument("--hest-root", default=None, help="HEST folder (st/, wsis/, metadata/) for HEST sample ids")
    p.add_argument("--overwrite", action="store_true", help="redo everything (default: skip what is complete)")
    p.add_argument(
        "--quiet", action="store_true", help="the summary line only: no progress bars, info lines or Dask messages"
    )


def _distributed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--on-error", choices=("skip", "stop"), default="skip", help="a failing slide: go on or stop")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_positive_int, default=None, help="Dask LocalCluster of N worker processes")
    where.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (tcp://host:8786)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads per slide task")


def _tune_malloc(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-tune-malloc",
        action="store_true",
        help="leave glibc's allocator alone while embedding patches (image_features(tune_malloc=False); default: "
        "freed memory is kept for reuse within the encoder loop, unless SPADE_SC_TUNE_MALLOC=0)",
    )


def _geometry(p: argparse.ArgumentParser, *, tile_help: str = "patch side in pixels") -> None:
    p.add_argument("--mpp", type=_positive_float, default=0.5, help="micrometres per pixel of the patches")
    p.add_argument("--patch-size", type=_positive_int, default=224, help=tile_help)
    p.add_argument("--image-key", default=None, help="the H&E image of .zarr slides that hold several")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="patches per encoder call")
    p.add_argument("--device", default="auto", help="torch device of the encoder (auto: CUDA when there is one)")
    p.add_argument(
        "--views",
        type=int,
        choices=(1, 2, 4, 8),
        default=None,
        help="dihedral views of each patch whose features are averaged (default: 8 for spots, as tl.fit; 1 for tiles)",
    )
    _tune_malloc(p)


def _features_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("features", help="patch features of every slide (spots, or tissue tiles with --tiles)")
    _common(p)
    p.add_argument("--out", required=True, help="output folder: one <slide_id>.zarr per slide")
    p.add_argument("--encoder", default="efficientnet_lite0", help="encoder (spade_sc.encoders.get_encoder)")
    p.add_argument("--encoder-weights", default=None, help="local weights file of a timm --encoder")
    p.add_argument("--tiles", action="store_true", help="tile the tissue and embed the tiles instead of the spots")
    _geometry(p)
    _distributed(p)
    p.set_defaults(func=_commands.features)


def _fit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit", help="train SPADE on the slides of a manifest; writes the model folder")
    _common(p)
    p.add_argument("--out", required=True, help="the model folder (model.safetensors + config.json + run records)")
    p.add_argument("--features", default=None, help="folder of `spade-sc features` (features computed where missing)")
    p.add_argument("--features-key", default=None, help="obsm key of existing features (default X_<encoder>)")
    p.add_argument("--encoder", default="efficientnet_lite0", help="encoder for missing features")
    p.add_argument("--encoder-weights", default=None, help="local weights file of a timm --encoder")
    p.add_argument("--mpp", type=_positive_float, default=0.5, help="micrometres per pixel of missing features")
    p.add_argument("--patch-size", type=_positive_int, default=224, help="patch side of missing features")
    _tune_malloc(p)
    p.add_argument("--epochs", type=_positive_int, default=100)
    p.add_argument("--batch-size", type=_positive_int, default=512, help="pairs per expert batch")
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--n-experts", type=_experts, default="auto", help="number of data experts, or auto")
    p.add_argument("--tissue-key", default=None, help="tissue grouping of the step-1 clustering")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", default=None, help="write a checkpoint at the end of every epoch here")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    p.add_argument("--accelerator", default=None, help="Lightning accelerator (cpu, gpu, auto)")
    p.add_argument("--devices", default=None, help="Lightning devices (a number, a list, auto)")
    p.add_argument("--num-nodes", type=_positive_int, default=None, help="Lightning nodes")
    p.add_argument("--strategy", default=None, help="Lightning strategy (ddp, ...)")
    p.set_defaults(func=_commands.fit)


def _embed_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="SPADE embedding (X_spade, routing, expert) of every slide")
    _common(p)
    p.add_argument("--model", required=True, help="a model folder written by `spade-sc fit` or SpadeModel.save")
    p.add_argument("--out", required=True, help="output folder: one <slide_id>.zarr per slide")
    p.add_argument("--features", default=None, help="folder of `spade-sc features` (features computed where missing)")
    p.add_argument("--tiles", action="store_true", help="embed the tissue tiles (tiling slides that have none)")
    _geometry(p)
    _distributed(p)
    p.set_defaults(func=_commands.embed)


def _slides_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("slides", help="tiles, tile embeddings and one row per slide in DIR/slides.h5ad")
    _common(p)
    p.add_argument("--model", required=True, help="a model folder written by `spade-sc fit` or SpadeModel.save")
    p.add_argument("--out", required=True, help="output folder: <slide_id>.zarr per slide and slides.h5ad")
    p.add_argument("--features", default=None, help="folder of `spade-sc features --tiles` (tiles reused)")
    _geometry(p, tile_help="tile side in pixels at --mpp")
    _distributed(p)
    p.set_defaults(func=_commands.slides)


def _mil_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mil", help="gated-attention MIL on the tiles of `spade-sc slides`; metrics and heatmaps")
    p.add_argument("source", help="the folder of `spade-sc slides`, or its slides.h5ad")
    p.add_argument("--out", required=True, help="output folder")
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--label", default=None, help="class label column (classification)")
    task.add_argument("--time", default=None, help="survival time column (with --event)")
    p.add_argument("--event", default=None, help="event column (1 observed, 0 censored)")
    p.add_argument("--features-key", default="X_spade", help="obsm key of the tile embeddings")
    p.add_argument("--folds", type=_positive_int, default=5, help="cross-validation folds")
    p.add_argument("--k-shot", type=_positive_int, default=None, help="few-shot: labelled slides per class")
    p.add_argument("--repeats", type=_positive_int, default=5, help="few-shot draws")
    p.add_argument("--epochs", type=_positive_int, default=20)
    p.add_argument("--lr", type=_positive_float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heatmaps", type=int, default=3, help="attention heatmaps of this many top-scored slides")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint every split's training at every epoch here")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --checkpoint-dir")
    _common(p, manifest=False)
    p.set_defaults(func=_commands_mil)


def _commands_mil(args: argparse.Namespace) -> int:
    from . import _mil_command

    return _mil_command.mil(args)


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="tl.evaluate over the slides: scores CSV and protocol JSON")
    _common(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--features", default=None, help="folder of `spade-sc features`")
    p.add_argument("--features-key", default=None, help="obsm key of the base features (default X_<encoder>)")
    p.add_argument("--encoder", default="efficientnet_lite0", help="encoder for missing features")
    p.add_argument("--encoder-weights", default=None, help="local weights file of a timm --encoder")
    _tune_malloc(p)
    p.add_argument("--label-key", default=None, help="obs column of spot labels for the label probe")
    p.add_argument("--epochs", type=_positive_int, default=100, help="SPADE epochs in every fold")
    p.add_argument("--n-experts", type=_experts, default="auto")
    p.add_argument("--n-draws", type=_positive_int, default=20, help="draws per few-shot setting")
    p.add_argument("--representations", default=None, help="comma-separated representations (default: all)")
    p.add_argument("--tasks", default=None, help="comma-separated tasks: expression, label, retrieval (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_commands.evaluate)


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run SPADE end to end on the synthetic cohort or on her2st")
    p.add_argument("--out", default="spade_sc_demo", help="output folder (default: ./spade_sc_demo)")
    p.add_argument(
        "--data",
        choices=["auto", "synthetic", "her2st"],
        default="auto",
        help="auto: her2st when $SPADE_SC_DATA holds it, else the synthetic cohort",
    )
    p.add_argument("--n-slides", type=int, default=4)
    p.add_argument("--n-spots", type=int, default=250, help="spots per synthetic slide")
    p.add_argument("--image-size", type=int, default=1536, help="side of the synthetic slides in pixels")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``spade-sc`` argument parser with every subcommand."""
    parser = _Parser(prog="spade-sc", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_demo_parser, _features_parser, _fit_parser, _embed_parser, _slides_parser, _mil_parser):
        add(sub)
    _evaluate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spade-sc`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.command == "mil" and args.time is not None and args.event is None:
        print("spade-sc mil: error: --time needs --event.", file=sys.stderr)
        return 2
    # spade_sc's own progress at INFO; other libraries (ome-zarr announces every array it reads) at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    try:
        return args.func(args)
    except UserError as err:
        print(f"spade-sc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spade-sc {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
