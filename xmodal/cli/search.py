"""``xmodal index``, ``xmodal query`` and ``xmodal serve``: build a searchable index of one modality, search it
from the command line, or serve it as a web page and JSON API (the library is :mod:`xmodal.retrieval`)."""
from __future__ import annotations

import json

from ..modalities.registry import get_modality, modality_names
from .common import RUN_HELP, add_hubness_flags, add_manifest_flags, bank_rows, read_manifest_for


def query_flags() -> dict[str, str]:
    """``xmodal query``'s query-input flags, one per registered modality (``--text``, ``--image``, ``--audio``, a
    plugin's ``--<name>``): the flag's name is the modality it searches with, its help the modality's own."""
    return {m: get_modality(m).query_help or f"query {m}" for m in modality_names()}


def add_index_verb(sub) -> None:
    s = sub.add_parser("index", help="embed one modality of a manifest into a searchable index")
    s.add_argument("--run", required=True, help=RUN_HELP)
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True, help="index folder to write (index.faiss, metadata.arrow, index.json)")
    s.add_argument("--modality", default="image", help="manifest column to embed (default image)")
    s.add_argument("--split", default=None, help="keep rows whose `split` column equals this")
    s.add_argument("--kind", choices=["flat", "hnsw", "ivf", "int8", "binary", "ivfpq"], default=None,
                   help="flat = exact (default); hnsw / ivf = approximate, for large collections; int8 (1 byte per "
                        "dimension), binary (1 bit, re-ranked by the float query), ivfpq (IVF + product "
                        "quantisation) = compressed")
    s.add_argument("--append", action="store_true",
                   help="add the manifest rows whose id is not yet in the existing index at --out")
    s.add_argument("--overwrite", action="store_true", help="replace an existing index (or a corrupt one) at --out")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--hnsw-m", type=int, default=None, help="hnsw: graph degree M (default 32)")
    s.add_argument("--ef-search", type=int, default=None, help="hnsw: efSearch (default 128)")
    s.add_argument("--nlist", type=int, default=None, help="ivf: inverted lists (default ~4*sqrt(n))")
    s.add_argument("--nprobe", type=int, default=None, help="ivf, ivfpq: lists probed per query (default nlist/8)")
    s.add_argument("--pq-m", type=int, default=None, help="ivfpq: sub-vectors, bytes per vector at 8 bits (default "
                                                         "dim/8)")
    s.add_argument("--pq-nbits", type=int, default=None, help="ivfpq: bits per sub-vector code (default 8)")
    s.add_argument("--rescore", type=int, default=None,
                   help="binary: candidates re-ranked by the float query, per hit (default 10); ivfpq: re-rank "
                        "N candidates per hit by the float vectors, kept on disk (vectors.npy, memory-mapped; "
                        "off by default)")
    s.add_argument("--dim", type=int, default=None,
                   help="index the first DIM coordinates of each embedding, renormalised (a model trained with "
                        "model.matryoshka_dims); queries are embedded the same way")
    s.add_argument("--tune", type=float, default=None, metavar="RECALL",
                   help="set the search setting (ef-search / nprobe / rescore) to the smallest reaching this "
                        "recall@10 against exact search, on the held-out queries of --tune-split")
    s.add_argument("--tune-split", default=None, help="--tune: the manifest split whose rows are the held-out "
                                                      "queries (not indexed; must differ from --split)")
    s.add_argument("--tune-modality", default=None, help="--tune: the queries' modality (default --modality)")
    s.add_argument("--tune-queries", type=int, default=500, help="--tune: at most this many queries (default 500)")
    s.add_argument("--hubness", choices=["is", "csls"], default=None,
                   help="store each row's hubness penalty against a query bank (is: inverted softmax / querybank "
                        "normalisation; csls); `xmodal query --hubness` then ranks by score minus penalty")
    add_hubness_flags(s)
    s.add_argument("--bank-modality", default=None,
                   help="--hubness: the queries' modality (default: the model's other tower)")
    add_manifest_flags(s)
    s.set_defaults(fn=run_index)


def add_index_shards_verb(sub) -> None:
    s = sub.add_parser("index-shards", help="join indexes built apart into one sharded index, or replace / remove a shard")
    s.add_argument("--index", required=True, help="sharded index folder (created when it does not exist)")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--add", nargs="+", metavar="PART", help="index folders (from `xmodal index`) to add as shards")
    g.add_argument("--replace", nargs=2, metavar=("SLOT", "PART"), help="replace shard SLOT by the index PART")
    g.add_argument("--remove", type=int, metavar="SLOT", help="remove shard SLOT")
    s.set_defaults(fn=run_index_shards)


def run_index_shards(args) -> int:
    from pathlib import Path

    from ..retrieval import RetrievalError
    from ..retrieval.sharded import ShardedIndex, is_sharded

    from ..retrieval.index import EmbeddingIndex

    path = Path(args.index)
    # every part read and checked first: a missing or clashing one changes nothing, not the parts before it
    parts = [(part, EmbeddingIndex.load(part)) for part in args.add or ()]
    if is_sharded(path):
        sharded = ShardedIndex.load(path)
    elif args.add:
        ShardedIndex(path, {}, {}, 0).check_additions(*(index for _, index in parts))
        sharded = ShardedIndex.create(path)
    else:
        raise RetrievalError(f"no sharded index at {path} (create one with --add)")
    if args.add:
        sharded.check_additions(*(index for _, index in parts))
        for part, index in parts:
            print(f"shard {sharded.add_shard(index)}: {part}")
    elif args.replace:
        if not args.replace[0].isdigit():
            raise RetrievalError(f"--replace SLOT PART: SLOT must be a shard number, got {args.replace[0]!r}")
        sharded.replace_shard(int(args.replace[0]), args.replace[1])
    else:
        sharded.remove_shard(args.remove)
    print(f"sharded index: {path} ({len(sharded.shards)} shards, {len(sharded)} rows; slots "
          f"{', '.join(map(str, sorted(sharded.shards))) or 'none'})")
    return 0


def add_query_verb(sub) -> None:
    s = sub.add_parser("query", help="search an index with a text, image or audio query")
    s.add_argument("--index", default=None,
                   help="index folder written by `xmodal index` (or `xmodal index-shards`); or give --server")
    s.add_argument("--server", default=None, metavar="URL",
                   help="ask a running `xmodal serve` (e.g. http://127.0.0.1:8000) instead: its model is already "
                        "loaded, so the answer takes milliseconds, not the seconds of loading torch and the model")
    q = s.add_mutually_exclusive_group(required=True)
    for modality, text in query_flags().items():
        q.add_argument(f"--{modality}", default=None, help=text)
    s.add_argument("-k", type=int, default=5, help="number of results (default 5)")
    s.add_argument("--filter", action="extend", nargs="+", default=None, metavar="key=value",
                   help="keep items whose metadata matches (repeat a key to allow several values)")
    s.add_argument("--run", default=None, help=RUN_HELP + " (default: the one recorded in the index)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--hubness", action="store_true",
                   help="rank by score minus each row's hubness penalty (an index built with --hubness)")
    s.set_defaults(fn=run_query)


def add_serve_verb(sub) -> None:
    s = sub.add_parser("serve", help="a web page and JSON API for searching an index")
    s.add_argument("--index", required=True, help="index folder written by `xmodal index`")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    s.add_argument("--run", default=None, help=RUN_HELP + " (default: the one recorded in the index)")
    s.add_argument("--max-concurrency", type=int, default=4, help="searches at once; more get 503 (default 4)")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds a search may take (default 30)")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MiB (default 10)")
    s.add_argument("--max-batch", type=int, default=32,
                   help="answer up to this many concurrent searches together, one model call and one index search "
                        "(default 32; 1: each on its own; batching measured 1.6-3.5x the throughput with pretrained "
                        "towers at 8-32 clients, see docs/benchmarks.md; a lone search waits at most 2 ms for others)")
    s.set_defaults(fn=run_serve)


def query_input(args) -> tuple[str, str]:
    """``(modality, value)`` of ``xmodal query``'s one query-input flag (argparse makes exactly one required)."""
    return next((m, getattr(args, m)) for m in query_flags() if getattr(args, m, None) is not None)


def run_index(args) -> int:
    from ..model import load
    from ..retrieval import RetrievalError, build_index

    if args.batch_size < 1:
        raise RetrievalError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = load(args.run)
    if args.modality not in model.towers:
        raise RetrievalError(f"the model in {args.run} has no {args.modality!r} tower "
                             f"(towers: {', '.join(model.towers)})")
    manifest = read_manifest_for(args, split=args.split, modalities=[args.modality], require_all=False)
    opts = {"M": args.hnsw_m, "ef_search": args.ef_search, "nlist": args.nlist, "nprobe": args.nprobe,
            "m": args.pq_m, "nbits": args.pq_nbits, "rescore": args.rescore}
    tune = _tune_queries(args, model) if args.tune is not None else None
    hubness = _hubness_bank(args, model) if args.hubness else None
    index = build_index(model, manifest, args.modality, args.out, kind=args.kind, batch_size=args.batch_size,
                        run_dir=args.run, append=args.append, overwrite=args.overwrite, tune=tune, dim=args.dim,
                        hubness=hubness, **opts)
    print(f"index: {args.out} ({len(index)} {args.modality} rows, {index.kind}, dim {index.dim})")
    if tune is not None:
        t = index.tuning
        setting = f"{t['knob']}={t['value']}" if t["knob"] else f"{index.kind} has no search setting"
        print(f"tuned on {t['queries']} held-out {tune['modality']} queries: {setting}, recall@{t['k']} "
              f"{t['recall']:.3f} (target {t['target']}{'' if t['reached'] else ', NOT reached'})")
    return 0


def _tune_queries(args, model) -> dict:
    """``--tune``'s held-out queries: up to ``--tune-queries`` rows of ``--tune-split`` (a fixed random sample)."""
    from ..retrieval import RetrievalError

    if not 0 < args.tune <= 1:
        raise RetrievalError(f"--tune takes a recall in (0, 1], got {args.tune}")
    if args.append:
        raise RetrievalError("--tune needs the vectors of the whole index: build it without --append")
    if args.tune_split is None or args.tune_split == args.split:
        raise RetrievalError("--tune needs held-out queries: name a --tune-split other than --split (e.g. val)")
    modality = args.tune_modality or args.modality
    if modality not in model.towers:
        raise RetrievalError(f"--tune-modality {modality!r}: the model in {args.run} has no such tower "
                             f"(towers: {', '.join(model.towers)})")
    held = read_manifest_for(args, split=args.tune_split, modalities=[modality], require_all=True)
    values = [v for v in getattr(held, "dataset", held)[modality] if v not in (None, "")]
    if not values:
        raise RetrievalError(f"--tune-split {args.tune_split!r}: no rows with a {modality!r} value")
    import random
    values = random.Random(0).sample(values, min(len(values), args.tune_queries))
    return {"target": args.tune, "modality": modality, "values": values}


def _hubness_bank(args, model) -> tuple:
    """``(Hubness, query bank)`` for ``xmodal index --hubness``: the embeddings of the queries' modality (the
    model's other tower, or ``--bank-modality``) in the run's training rows (or ``--bank-manifest``)."""
    from ..evaluation.evaluate import query_banks
    from ..retrieval import RetrievalError
    from ..retrieval.hubness import Hubness

    others = [m for m in model.towers if m != args.modality]
    query = args.bank_modality or (others[0] if len(others) == 1 else None)
    if query not in model.towers:
        raise RetrievalError(f"--hubness: name the queries' modality with --bank-modality (towers: "
                             f"{', '.join(model.towers)})")
    bank = query_banks(model, bank_rows(args, [query]), [query], batch_size=args.batch_size)[query]
    return Hubness(args.hubness), bank


def run_query(args) -> int:
    from ..retrieval import RetrievalError, format_hits, parse_filters

    if args.k < 1:
        raise RetrievalError(f"-k must be at least 1, got {args.k}")
    if (args.index is None) == (args.server is None):
        raise RetrievalError("give the index to search: --index DIR, or --server URL of a running `xmodal serve`")
    modality, value = query_input(args)
    if args.server is not None:
        if args.run is not None:
            raise RetrievalError("--run goes with --index: a server answers with the model it loaded")
        answer = ask_server(args.server, modality, value, args.k, parse_filters(args.filter))
        if args.json:
            print(json.dumps({"server": args.server, "query": {"modality": modality, "value": value},
                              "hits": answer["hits"]}, indent=2))
        else:
            print(format_hits(answer["hits"]))
        return 0
    from ..retrieval import Retriever

    retriever = Retriever(args.index, model=args.run)
    hits = retriever.search(value, modality, k=args.k, filter=parse_filters(args.filter), hubness=args.hubness)
    if args.json:
        print(json.dumps({"index": str(retriever.index_dir), "query": {"modality": modality, "value": value},
                          "hits": [{"rank": r, **h.to_dict()} for r, h in enumerate(hits, 1)]}, indent=2))
    else:
        print(format_hits(hits))
    return 0


def run_serve(args) -> int:
    from ..retrieval import RetrievalError
    from ..retrieval.service import serve

    if not 0 <= args.port <= 65535:
        raise RetrievalError(f"--port must be in 0..65535, got {args.port}")
    for flag, value in (("--max-concurrency", args.max_concurrency), ("--timeout", args.timeout),
                        ("--max-upload-mb", args.max_upload_mb), ("--max-batch", args.max_batch)):
        if not value > 0:
            raise RetrievalError(f"{flag} must be positive, got {value}")
    # The web page and JSON API read their own query inputs (text, image upload): xmodal.retrieval.service.
    serve(args.index, args.host, args.port, model=args.run, max_concurrency=args.max_concurrency,
          search_timeout=args.timeout, max_body_bytes=max(1, int(args.max_upload_mb * 1024 * 1024)),
          max_batch=args.max_batch)
    return 0


def ask_server(url: str, modality: str, value: str, k: int, filt: dict | None, timeout: float = 60.0) -> dict:
    """``POST URL/api/search`` of a running ``xmodal serve``: a string-valued modality's query as itself, a file as
    ``<modality>_base64``. Imports no torch or faiss; an unreachable server or an error answer is one line."""
    import base64
    import urllib.error
    import urllib.request
    from pathlib import Path

    from ..retrieval import RetrievalError

    if get_modality(modality).value == "string":
        body: dict = {modality: value}
    else:
        try:
            body = {f"{modality}_base64": base64.b64encode(Path(value).expanduser().read_bytes()).decode("ascii")}
        except OSError as e:
            raise RetrievalError(f"{modality} query file {value}: {e.strerror or e}") from None
    body["k"] = k
    if filt:
        body["filter"] = filt
    request = urllib.request.Request(url.rstrip("/") + "/api/search", data=json.dumps(body).encode("utf-8"),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:  # the server's own one-line JSON error
        try:
            message = json.loads(e.read()).get("error", e.reason)
        except ValueError:
            message = e.reason
        raise RetrievalError(f"{url} answered {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RetrievalError(f"cannot reach an xmodal server at {url} ({reason}); start one with `xmodal serve "
                             f"--index DIR`") from None
