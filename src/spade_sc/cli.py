"""Command line of spade_sc: ``spade-sc demo`` runs SPADE end to end."""

from __future__ import annotations

import argparse
import logging
import sys

from ._demo import demo

logger = logging.getLogger("spade_sc")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spade-sc`` console script."""
    parser = argparse.ArgumentParser(prog="spade-sc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
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
    args = parser.parse_args(argv)
    # spade_sc's own progress at INFO; other libraries (ome-zarr announces every array it reads) at WARNING
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
