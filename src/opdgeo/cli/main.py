"""The ``opdgeo`` command.

Each subcommand lives in its own module under ``opdgeo.cli`` and is registered here
lazily, so ``opdgeo --help`` does not import torch. A user mistake (``OpdgeoError``)
becomes one line on stderr and exit code 2; never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

# subcommand name -> (module, attribute, one-line help)
SUBCOMMANDS = {
    "compare": ("opdgeo.cli.compare", "compare_cmd", "Diagnose a base -> fine-tuned checkpoint pair (SPEC §1)."),
    "trajectory": ("opdgeo.cli.trajectory", "trajectory_cmd", "Follow a run's update over its checkpoints (SPEC §2)."),
    "train": ("opdgeo.cli.train", "train_cmd", "Train with SFT, RLVR (GRPO) or OPD from a YAML config (SPEC §3)."),
    "eval": ("opdgeo.cli.eval", "eval_cmd", "Evaluate a model on a verifiable task (avg@k)."),
    "study": ("opdgeo.cli.study", "study_cmd", "Reproduce the study end to end and write a report."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [name for name, (module, _, _) in SUBCOMMANDS.items() if importlib.util.find_spec(module)]

    def get_command(self, ctx, name):
        if name not in SUBCOMMANDS:
            return None
        module, attr, _ = SUBCOMMANDS[name]
        if importlib.util.find_spec(module) is None:
            return None
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, SUBCOMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="opdgeo")
def cli():
    """opdgeo: parameter-space geometry of LLM post-training (SFT, RLVR, OPD)."""


def main(argv=None):
    """Run the ``opdgeo`` command: the one place where every expected failure becomes one
    line ``opdgeo: error: ...`` on stderr and exit code 2.

    Expected failures: an ``OpdgeoError`` (bad path, corrupt file, invalid config), a click
    usage error (unknown option, bad choice or type; click's own three-line form is not
    used), and an ``OSError`` that reaches the top (an output the system refuses: a
    read-only folder, a full disk); the last names the file and the system's reason.
    """
    import importlib.util  # noqa: F401  (LazyGroup uses importlib.util)

    from opdgeo.errors import OpdgeoError

    try:
        cli.main(args=argv, prog_name="opdgeo", standalone_mode=False)
    except OpdgeoError as err:
        _fail(str(err))
    except click.exceptions.Abort:
        click.echo("opdgeo: aborted", err=True)
        sys.exit(130)
    except click.UsageError as err:
        command = err.ctx.command_path if err.ctx is not None else "opdgeo"
        _fail(f"{err.format_message()} (see '{command} --help')")
    except click.ClickException as err:
        _fail(err.format_message())
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("opdgeo: interrupted", err=True)
        sys.exit(130)
    except OSError as err:
        where = f"{err.filename}: " if err.filename else ""
        _fail(f"{where}{err.strerror or err}")


def _fail(message: str) -> None:
    """Print ``opdgeo: error: <message>`` as one line (inner newlines joined by "; ") and exit 2."""
    one_line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    click.echo(f"opdgeo: error: {one_line}", err=True)
    sys.exit(2)
