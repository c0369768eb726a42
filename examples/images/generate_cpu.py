"""Text prompts to images, with a manifest: the Sky Batch multi-output example on CPU.

    skybatch pool apply pool.yaml --pool image-pool -y
    python generate_cpu.py

Each prompt becomes images/00000000.png, ... and manifest.jsonl maps each prompt
to its file. The "generator" draws the prompt with PIL so this runs anywhere;
generate_sd.py is the same job with Stable Diffusion on a GPU pool.
"""

import skybatch

ds = skybatch.Dataset(skybatch.JsonReader("prompts.jsonl"))


@skybatch.remote_function
def generate_images():
    import zlib

    from PIL import Image, ImageDraw

    def draw(prompt):
        # A colour from the prompt's checksum, and the prompt written on it.
        color = zlib.crc32(prompt.encode()).to_bytes(4, "big")[:3]
        img = Image.new("RGB", (256, 256), tuple(color))
        ImageDraw.Draw(img).multiline_text((12, 12), prompt.replace(", ", ",\n"), fill="white")
        return img

    for batch in skybatch.load():
        skybatch.save_results(
            [{"prompt": item["prompt"], "image": draw(item["prompt"])} for item in batch]
        )


ds.map(
    generate_images,
    pool_name="image-pool",
    batch_size=2,
    output=[
        skybatch.ImageWriter("images/", column="image"),
        skybatch.JsonWriter("manifest.jsonl", column=["prompt", "image"]),
    ],
)
