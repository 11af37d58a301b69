"""Build and search a retrieval index of image and report embeddings (faiss; exact or approximate).

`index build` encodes every manifest row not yet in the index (resumable: run it again after an
interruption or with a longer manifest and it appends only what is new). `index search` finds the
studies closest to a text query or to a volume; the index refuses a bundle other than the one it
was built with. Results print ids, scores, body regions and image paths; report text is written
only to the --json file, never printed.

examples:
  decipher-mr index build --bundle demo/model.zip --manifest demo/data/manifest.jsonl --out demo/index
  decipher-mr index search demo/index --text "lesion in the left frontal lobe" -k 10
  decipher-mr index search demo/index --volume demo/data/images/brain-003.nii.gz -k 5 --space report
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="encode a manifest's studies into an index (resumable, appends)")
    b.add_argument("--bundle", required=True, help="model bundle (folder or .zip)")
    b.add_argument("--manifest", required=True, help="manifest (JSON Lines)")
    b.add_argument("--out", required=True, help="index folder (created, or appended to)")
    b.add_argument("--batch", type=int, default=32, help="studies per committed segment (default 32)")
    b.add_argument("--device", default="auto")
    s = sub.add_parser("search", help="search an index by text or by volume")
    s.add_argument("index", help="index folder")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="text query")
    q.add_argument("--volume", help="query volume (file or DICOM folder)")
    s.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    s.add_argument("--space", choices=("image", "report"), default="image",
                   help="search the studies' image embeddings (default) or their report embeddings")
    s.add_argument("--bundle", default=None, help="model bundle (default: the one the index was built with)")
    s.add_argument("--exact", action="store_true", help="brute-force search instead of the approximate index")
    s.add_argument("--json", default=None, help="also write the hits, with report text, to this JSON file")
    s.add_argument("--device", default="auto")


def run(args: argparse.Namespace) -> int:
    from decipher_mr.bundle import BundleError
    from decipher_mr.index import IndexStoreError

    try:
        return _build(args) if args.action == "build" else _search(args)
    except (BundleError, IndexStoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _build(args: argparse.Namespace) -> int:
    from decipher_mr.index import VectorIndex, build_index
    from decipher_mr.inference import Session

    session = Session.from_bundle(args.bundle, device=args.device, heads=[])
    summary = build_index(session, args.manifest, args.out, batch=args.batch)
    total = VectorIndex.open(args.out).count
    print(f"index {args.out}: added {summary.added}, already there {summary.skipped}, failed {len(summary.failed)}; "
          f"{total} studies in all", file=sys.stderr)
    for where, err in summary.failed:
        print(f"  failed {where}: {err}", file=sys.stderr)
    return 1 if summary.failed else 0


def _search(args: argparse.Namespace) -> int:
    from decipher_mr.index import VectorIndex
    from decipher_mr.inference import Session
    from decipher_mr.storage import atomic_write_json

    idx = VectorIndex.open(args.index)
    bundle = args.bundle or idx.meta.get("bundle")
    if not bundle:
        raise ValueError(f"{args.index}: the index does not name its bundle; pass --bundle")
    session = Session.from_bundle(bundle, device=args.device, heads=[])
    idx.check_fingerprint(session.fingerprint, str(bundle))
    if args.text is not None:
        hits = session.search_text(args.text, idx, k=args.k, space=args.space, exact=args.exact)
    elif args.space == "report":
        hits = session.retrieve_reports(args.volume, index=idx, k=args.k, exact=args.exact)
    else:
        hits = session.retrieve_cases(args.volume, idx, k=args.k, exact=args.exact)
    print(f"{'rank':>4}  {'score':>8}  {'id':<24} {'study':<20} {'region':<10} image")
    for h in hits:
        m = h.metadata
        print(f"{h.rank:>4}  {h.score:>8.4f}  {str(m.get('id')):<24} {str(m.get('study_id')):<20} "
              f"{str(m.get('body_region')):<10} {m.get('image')}")
    if args.json:
        atomic_write_json(args.json, {"index": str(args.index), "space": args.space, "exact": args.exact,
                                      "hits": [h.summary(include_report=True) for h in hits]})
    return 0
