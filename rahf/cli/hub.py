"""``rahf push``: publish a checkpoint directory as a Hugging Face Hub model repo (with its model card)."""

from __future__ import annotations

import argparse
import os


def run_push(args: argparse.Namespace) -> int:
    from ..model.card import write_model_card
    from ..model.hub import CheckpointNotFoundError, prepare_upload, push_to_hub

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise SystemExit(f"rahf push: --token-env {args.token_env}: that environment variable is not set")
    try:
        if args.dry_run:
            card = write_model_card(args.checkpoint, repo_id=args.repo, license=args.license,
                                    datasets=args.dataset, overwrite=args.overwrite_card)
            files = prepare_upload(args.checkpoint)
            print(f"model card: {card or 'kept the hand-written README.md'}")
            print(f"would upload {len(files)} file(s) to {args.repo}"
                  + (f" (branch {args.revision})" if args.revision else "") + ":")
            for f in files:
                print(f"  {f}")
            return 0
        info = push_to_hub(args.checkpoint, args.repo, revision=args.revision, private=args.private or None,
                           token=token, commit_message=args.commit_message, license=args.license,
                           datasets=args.dataset, overwrite_card=args.overwrite_card)
    except (CheckpointNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"rahf push: {e}") from e
    print(f"pushed {args.checkpoint} to {getattr(info, 'commit_url', None) or args.repo}")
    print(f'load it with RAHFScorer.from_pretrained("{args.repo}") or --checkpoint {args.repo}')
    return 0


def register(sub) -> None:
    p = sub.add_parser("push", help="publish a checkpoint on the Hugging Face Hub (safetensors, config, "
                                    "tokenizer, metrics and a generated model card)")
    p.add_argument("--checkpoint", required=True, help="a save_pretrained directory (e.g. RUN/export)")
    p.add_argument("--repo", required=True, help="the Hub model repo, org/name (created if missing)")
    p.add_argument("--revision", "--branch", dest="revision", default=None,
                   help="branch to commit to (created from main if missing; default main)")
    p.add_argument("--private", action="store_true", help="create the repo as private (a new repo only)")
    p.add_argument("--token-env", default=None, metavar="NAME",
                   help="environment variable holding the Hub token (default: HF_TOKEN or the saved login)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--license", default=None, help="licence id for the card (default: other)")
    p.add_argument("--dataset", action="append", default=None, metavar="NAME",
                   help="dataset name for the card's front matter (repeatable; default: detected from the run)")
    p.add_argument("--overwrite-card", action="store_true", help="replace a hand-written README.md")
    p.add_argument("--dry-run", action="store_true",
                   help="write the card and list the files that would be uploaded, without uploading")
    p.set_defaults(func=run_push)
