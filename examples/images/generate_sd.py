"""Text prompts to images with Stable Diffusion on GPU workers (not run by the tests:
it needs a GPU and the model's weights).

    skybatch pool apply pool_gpu.yaml --pool diffusion-pool -y
    python generate_sd.py
"""

import skybatch


@skybatch.remote_function
def generate_images():
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        torch_dtype=torch.float16,
    )
    pipe = pipe.to("cuda")

    for batch in skybatch.load():
        prompts = [item["prompt"] for item in batch]
        result = pipe(prompts)
        skybatch.save_results(
            [
                {"prompt": item["prompt"], "image": img}
                for item, img in zip(batch, result.images, strict=True)
            ]
        )


ds = skybatch.Dataset(skybatch.JsonReader("prompts.jsonl"))
ds.map(
    generate_images,
    pool_name="diffusion-pool",
    batch_size=3,
    output=[
        skybatch.ImageWriter("images/", column="image"),
        skybatch.JsonWriter("manifest.jsonl", column=["prompt", "image"]),
    ],
    activate_env="source .venv/bin/activate",
)
