"""``geomgen report DIR``: the HTML page of every SDF package under a folder
(geomgen.report), and the one line ``generate`` and ``demo`` print about it."""

from __future__ import annotations

from pathlib import Path

import click

from geomgen.report import write_report


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def report(folder: Path) -> None:
    """Write FOLDER/index.html: a table of every SDF package under FOLDER.

    Each row, read from the package's manifest: its preview.png (visual and
    collision pieces side by side), mass, size, collision pieces and method,
    the Drake and MuJoCo checks, warnings and conversion seconds. Click a
    column header to sort. The page needs no network: open it from the file
    system, or move it with the folder.

    \b
    Example:
      geomgen report assets/ && xdg-open assets/index.html
    """
    try:
        path, count = write_report(folder)
    except OSError as exc:
        raise click.ClickException(f"cannot write the report in {folder}: {exc.strerror or exc}") from None
    if count == 0:
        click.echo(f"geomgen: warning: no SDF package under {folder} (looked for <name>/<name>.sdf with its "
                   "<name>.json manifest)", err=True)
    click.echo(f"{path.resolve()}  ({count} asset{'s' * (count != 1)})")


def report_line(out_dir: Path) -> str:
    """The report of ``out_dir`` written, as the line ``generate`` and ``demo``
    print; a report that cannot be written is a warning, never a failed run."""
    try:
        path, count = write_report(out_dir)
    except OSError as exc:
        return f"geomgen: warning: no report written in {out_dir}: {exc.strerror or exc}"
    return f"geomgen: report of {count} asset{'s' * (count != 1)}: {path.resolve()}"
