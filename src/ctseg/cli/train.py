"""``ctseg fit | validate | test``: train and evaluate from YAML configs (LightningCLI).

Examples::

    ctseg fit --config configs/synthetic/unetformer-cl.yaml
    ctseg fit --config configs/dubai/unetformer.yaml --trainer.max_epochs 3 --data.batch_size 2
    ctseg fit --config configs/synthetic/unetformer-cl.yaml --ckpt_path last      # resume in place
    ctseg test --config configs/synthetic/unetformer-cl.yaml --ckpt_path runs/synthetic/unetformer-cl/checkpoints/last.ckpt

See ``docs/training.md`` and ``ctseg fit --help``.
"""

from __future__ import annotations

TAKES_COMMAND_NAME = True


def main(command: str, argv: list[str]) -> int:
    from ctseg.engine.cli import run_cli

    try:
        run_cli(command, argv)
    except SystemExit as exc:
        # Lightning answers Ctrl-C with sys.exit(1) after its callbacks ran (our InterruptCheckpoint
        # saved and printed how to resume); hand it to the CLI as an interrupt (exit status 130).
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
        raise
    return 0
