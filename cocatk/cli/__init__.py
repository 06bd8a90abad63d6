"""cocatk's command line. `main()` is the console script: it turns library errors into one line and an exit code."""

from __future__ import annotations

import sys
from collections.abc import Sequence

_INTERRUPTED = "interrupted: work committed so far is kept; run the same command again to resume"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return (and, as a console script, exit with) the process exit code.

    Errors raised by the library (:class:`cocatk.errors.CocatkError`) print one line ``error: ... Fix: ...`` on
    stderr; ``COCATK_DEBUG=1`` adds the traceback.
    """
    import typer
    from rich.text import Text

    try:  # typer >= 0.20 vendors click
        from typer._click.exceptions import ClickException
    except ImportError:  # pragma: no cover - older typer on top of click
        from click import ClickException

    from ..config import debug_enabled
    from ..errors import CocatkError
    from .app import app
    from .render import err

    if argv is None:  # a real process (console script, python -m cocatk): cocatk owns it
        from .._imports import defer_optional_imports

        defer_optional_imports()  # open_clip without transformers/timm unless the model needs them: ~1 s less
    args = list(sys.argv[1:] if argv is None else argv)
    code = 0
    try:
        result = app(args=args, prog_name="cocatk", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        if code == 130:  # typer turns Ctrl-C into a silent return value of 130 (standalone_mode=False)
            err.print(_INTERRUPTED, style="red")
    except CocatkError as e:
        if debug_enabled():
            err.print_exception()
        err.print(Text.assemble(("error: ", "bold red"), e.one_line()), highlight=False, soft_wrap=True)
        code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        err.print("aborted", style="red")
        code = 130
    except ClickException as e:
        e.show()
        code = e.exit_code
    except KeyboardInterrupt:
        err.print(_INTERRUPTED, style="red")
        code = 130
    except Exception as e:  # a bug, not a user error: one line, the traceback only on request
        if debug_enabled():
            raise
        err.print(
            Text.assemble(
                ("error: ", "bold red"),
                f"internal error ({type(e).__name__}: {str(e)[:200]}). Fix: this is a cocatk bug; run again with "
                "COCATK_DEBUG=1 and report the traceback (work committed so far is kept)",
            ),
            highlight=False,
            soft_wrap=True,
        )
        code = 1
    if argv is None:
        # The command is done. The interpreter's last garbage collections would walk the millions of objects torch and
        # open_clip leave (1.3-1.5 s of a 7 s search on 2 cores); frozen, they are skipped. Objects are still freed
        # by reference counting, atexit handlers and the flush of stdout/stderr still run; only garbage cycles are
        # left to the OS, as at any exit.
        import gc

        gc.freeze()
        sys.exit(code)
    return code


__all__ = ["main"]
