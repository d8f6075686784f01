"""distmerge push OUTPUT_DIR ORG/NAME [--private] [--revision B] [--create-pr] [--message M]"""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  distmerge push ./merged my-org/support-bot-merged
  distmerge push ./merged my-org/support-bot-merged --private --revision nightly
  distmerge push /shared/merged/zoo/all-code my-org/all-code --create-pr --message "Re-merge with svd_rank 64"
"""


def add_parser(subs) -> None:
    p = subs.add_parser("push", help="upload a finished distmerge output to the Hugging Face Hub",
                        description="Upload a complete distmerge output directory (every file its distmerge.json "
                                    "lists, unchanged) to a Hub model repo in one commit, creating the repo and the "
                                    "branch when missing. This is also how a failed upload of `merge` or `batch` "
                                    "is retried. The token comes from HF_TOKEN or `hf auth login`.",
                        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", metavar="OUTPUT_DIR", help="a directory distmerge wrote")
    p.add_argument("repo", metavar="ORG/NAME", help="the Hub model repo")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo is unchanged)")
    p.add_argument("--revision", default=None, metavar="BRANCH", help="commit to this branch, created when missing")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    p.add_argument("--message", default=None, metavar="M", help="the commit's one-line summary")
    p.set_defaults(run=run)


def run(args) -> int:
    import os
    from pathlib import Path

    from distmerge.errors import DistmergeError, OutputError
    from distmerge.output.manifest import MANIFEST
    from distmerge.output.owner import not_ours
    from distmerge.publish.hub import describe, push, record, repo_id_problem, revision_problem, write_pushed

    problems = [f"ORG/NAME: {why}" for why in [repo_id_problem(args.repo)] if why]
    problems += [f"--revision: {why}" for why in [args.revision is not None and revision_problem(args.revision)]
                 if why]
    if args.message is not None and (not args.message.strip() or "\n" in args.message):
        problems.append(f"--message: a commit's one-line summary, got {args.message!r}")
    if problems:
        raise DistmergeError("; ".join(problems))
    path = os.path.abspath(args.output)
    if not os.path.isdir(path):
        raise OutputError(f"{path} is not a directory; give the output.path of a finished merge")
    why = not_ours(Path(path)) or (None if os.path.isfile(os.path.join(path, MANIFEST)) else "is empty")
    if why:
        raise OutputError(f"{path} {why}; distmerge push uploads only a complete distmerge output, exactly the "
                          f"files its {MANIFEST} lists")
    info = push(path, args.repo, private=args.private, revision=args.revision, create_pr=args.create_pr,
                commit_message=args.message)
    done = record(args.repo, args.revision, info)
    write_pushed(path, done)  # a batch then knows this output is pushed and does not push it again
    print(describe(done))
    return 0
