"""Search the shared space from Python: encode, compare by dot product, index, query.

Loads a pretrained run, embeds a few text queries and the held-out (test) drawings of Open Clip Art, finds each
query's best drawing by a plain dot product, then does the same through a faiss index (EmbeddingIndex) and, the other
way round, searches the drawings' captions with images (build_index + Retriever).

    bash scripts/quickstart.sh          # once: makes runs/quickstart and data/openclipart
    .venv/bin/python examples/search.py         # ~30 s on 2 CPU cores; --max-rows 200 for a quicker run
"""
import argparse
import tempfile

import xmodal
from xmodal.data import read_manifest
from xmodal.retrieval import EmbeddingIndex, Retriever, build_index, format_hits

QUERIES = ["a flag", "a map", "a bird", "a car"]


def main(argv=None):
    p = argparse.ArgumentParser(description="text→image and image→text search with the Python API")
    p.add_argument("--run", default="runs/quickstart", help="a pretrained run folder")
    p.add_argument("--manifest", default="data/openclipart/manifest.csv")
    p.add_argument("--max-rows", type=int, default=None, help="search only N test rows (spread over the split)")
    args = p.parse_args(argv)

    model = xmodal.load(args.run)  # eval mode, weights from model.safetensors
    # The test split: drawings the shared space never trained on. Image paths come back absolute.
    test = read_manifest(args.manifest, split="test", modalities=["image", "text"])
    if args.max_rows and args.max_rows < len(test):  # rows are grouped by category: take them spread over the split
        test = test.take(range(0, len(test), len(test) // args.max_rows)[:args.max_rows])
    rows = test.rows.to_dict()  # {column: [values]}
    ids, images = rows["id"], rows["image"]

    # 1. Every tower ends in one L2-normalised space, so cosine similarity is just a dot product.
    text_emb = model.encode("text", QUERIES)  # [4, embed_dim] float32
    image_emb = model.encode("image", images)  # [n, embed_dim]
    norms = image_emb.norm(dim=1)
    print(f"{len(images)} test drawings -> embeddings {tuple(image_emb.shape)}, "
          f"L2 norms {norms.min():.3f}-{norms.max():.3f}")
    scores = text_emb @ image_emb.T  # [4, n] cosine similarities
    for query, row in zip(QUERIES, scores):
        best = int(row.argmax())
        print(f"dot product   {query!r:10} -> {ids[best]}  cos {float(row[best]):.4f}")

    # 2. The same search through an exact inner-product faiss index (same top hits as above), reusing the embeddings.
    #    (For millions of rows: EmbeddingIndex(dim, "hnsw") or "ivf"; .save(folder) / EmbeddingIndex.load(folder).)
    index = EmbeddingIndex(image_emb.shape[1])
    index.add(image_emb, [{"id": i, "label": lab, "value": path}
                          for i, lab, path in zip(ids, rows["label"], images)])
    for query, hits in zip(QUERIES, index.search(text_emb, k=3)):
        print(f"\ntext -> image: {query!r}\n{format_hits(hits)}")

    # 3. Image -> text: build_index embeds one column of the manifest (here the captions) and saves an index with each
    #    row's id, label and value; Retriever pairs it with the model that built it (checked by a fingerprint of the
    #    weights) and embeds the queries, here image files. For an index you keep, build_index(..., run_dir=args.run)
    #    records the run folder, and Retriever(folder) then loads the model by itself.
    with tempfile.TemporaryDirectory() as tmp:
        build_index(model, test, "text", f"{tmp}/captions", progress=False)
        captions = Retriever(f"{tmp}/captions", model=model)
        for i, hits in enumerate(captions.search(images[:2], "image", k=3)):
            print(f"\nimage -> text: {ids[i]} (its own caption: {rows['text'][i][:50]!r})\n{format_hits(hits)}")


if __name__ == "__main__":
    main()
