import skybatch

ds = skybatch.Dataset(skybatch.JsonReader("data.jsonl"))


@skybatch.remote_function
def double_text():
    for batch in skybatch.load():
        skybatch.save_results([{"output": item["text"] * 2} for item in batch])


ds.map(double_text, pool_name="my-pool", batch_size=2, output=skybatch.JsonWriter("out.jsonl"))
