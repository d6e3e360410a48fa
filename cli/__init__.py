"""The ``cachehub`` command line (a thin Typer layer over ``cachehub.api``)."""
