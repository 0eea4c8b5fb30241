"""``erde-export model.pt``: write per-segment ONNX graphs, full.onnx and manifest.json."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from erde.runtime.common.cli import command, console_script, force_option



@command("erde-export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Model folder to write (default: <checkpoint name>_onnx beside the checkpoint).")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="The image folder the model was trained on: the self-test (erde-verify) takes validation "
                   "images from it; without it, seeded random images.")
@force_option
@click.option("--exits", default=None,
              help="Keep only these trained early exits (block indices, comma-separated, e.g. 1): drop an exit "
                   "that does not pay for its latency, without retraining.")
@click.option("--single-graph", is_flag=True,
              help="Also write early_exit.onnx: the whole model as one graph with nested If nodes, which the "
                   "engine then uses at batch 1. Measure it against the segment chain first "
                   "(python scripts/if_graph.py --model DIR); on the students measured so far it was slower (docs/reference.md).")
def cli(checkpoint: Path, out: Path, data: Path, force: bool, exits: str, single_graph: bool, debug: bool) -> None:
    """Export an ERDE checkpoint to a model folder for the torch-free runtime.

    Every export checks each graph with onnx.checker, cross-checks the MACs
    against the ONNX graphs and checks that ONNX Runtime matches PyTorch;
    the folder appears only if all checks pass.
    """
    from erde.training.models import parse_exits  # torch: imported here, so that --help and bad options are quick

    from .exporter import default_out_dir, export_checkpoint

    out = out or default_out_dir(checkpoint)
    keep = parse_exits(exits) if exits else None
    shown = []

    def report(line: str) -> None:  # the header only once there is a check to show (not before an error)
        if not shown:
            click.echo("parity with PyTorch, through the runtime (Engine.load):")
            shown.append(line)
        click.echo("  " + line)

    m = export_checkpoint(checkpoint, out, force, report=report, exits=keep, single_graph=single_graph,
                          data=data)
    click.echo(f"wrote {out}/ ({m.model_name}, {m.num_exits} exits, {len(m.class_names)} classes)")
    for s in m.segments:
        click.echo(f"  {s.file}: exit at {s.cumulative_macs:,} MACs ({s.cumulative_macs / m.full_macs:.0%} of full)")
    click.echo(f"  full.onnx: {m.full_macs:,} MACs")


main = console_script(cli)


if __name__ == "__main__":
    sys.exit(main())
