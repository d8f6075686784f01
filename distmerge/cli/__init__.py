"""`distmerge SUBCOMMAND ...`: one file per subcommand, each with runnable examples in its help."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import traceback

from distmerge.cli import batch, demo, evaluate, merge, methods, plan, push
from distmerge.errors import DistmergeError, Terminated

ISSUES = "https://github.com/distmerge/distmerge/issues"

SUBCOMMANDS = (merge, batch, plan, evaluate, push, methods, demo)


def build_parser() -> argparse.ArgumentParser:
    from distmerge import __version__

    parser = argparse.ArgumentParser(
        prog="distmerge", description="Merge many PEFT LoRA adapters into one, from their files, locally or on Ray.",
        epilog="Run `distmerge SUBCOMMAND --help` for examples.")
    parser.add_argument("--version", action="version", version=f"distmerge {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    subs = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subs)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after a flag (`batch ZOO --only x key=value`) still are overrides
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="[distmerge] %(message)s",
                        stream=sys.stderr)
    with _sigterm_raises():
        try:
            return args.run(args) or 0
        except DistmergeError as e:
            print(f"distmerge {args.command}: error: {e}", file=sys.stderr)
            return e.exit_code
        except BrokenPipeError:  # `distmerge plan ... | head`: the reader left; not an error of anyone's
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except (KeyboardInterrupt, Terminated) as e:
            what, code = ("terminated", 143) if isinstance(e, Terminated) else ("interrupted", 130)
            print(f"distmerge {args.command}: {what}; nothing was written", file=sys.stderr)
            return code
        except Exception as e:  # a bug of ours, never the user's input: say so, keep the traceback for the report
            print(f"distmerge {args.command}: internal error: {type(e).__name__}: {_one_line(e)}. This is a bug in "
                  f"distmerge, not in your input; please file an issue at {ISSUES} with the command and the "
                  f"traceback saved in {_save_traceback()}", file=sys.stderr)
            return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def _save_traceback() -> str:
    text = traceback.format_exc()
    if os.environ.get("DISTMERGE_DEBUG"):
        print(text, file=sys.stderr)
    try:
        fd, path = tempfile.mkstemp(prefix="distmerge-crash-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path
    except OSError:
        print(text, file=sys.stderr)
        return "the lines above"


class _sigterm_raises:
    """SIGTERM (a scheduler's cancel, `kill`) unwinds like Ctrl-C, so staging and workers are cleaned up."""

    def __enter__(self):
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        except ValueError:  # not the main thread: leave signals to the host program
            pass
        return self

    @staticmethod
    def _raise(signum, frame):
        raise Terminated()

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def entry() -> None:
    """The `distmerge` program: main(), then exit without tearing the interpreter down.

    Everything main() opened is closed by then (the Ray executor shuts Ray down on exit), and
    unloading torch costs 0.3-0.8 s, a quarter of a whole factor-method merge. Python callers of
    main() keep the normal shutdown.
    """
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
