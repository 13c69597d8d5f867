"""CPU inference cost of the bundled model, cloud half vs the unsplit model, by batch size.

    .venv/bin/python benchmarks/cpu_inference.py [--batches 1 8 32] [--repeats 5]

Per batch size: the cloud half as the worker runs it (bitstream decode -> codebook gather ->
up-projection -> vision blocks -> projector -> greedy generate), and plain Hugging Face
``generate`` of the unsplit model from pixels, in the same process. Plus the numpy edge encoder
per image. Raw JSON to ``benchmarks/results/cpu_inference.json`` with the machine named.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from benchmarks.harness.record import RESULTS, header, write_result
from benchmarks.harness.stats import timed
from edge_client.bitstream import decode_stream
from edge_client.bundle import EdgeBundle
from edge_client.encoder import EdgeEncoder
from models.data import load_easy_vqa
from models.export import export_edge_bundle
from models.prompt import encode_prompts
from models.quantizer import AlignedVQ
from models.split import split_llava
from models.store import DEFAULT_QUANTIZER, load_model
from models.tensor_split import pixel_values

MAX_NEW_TOKENS = 2  # single-word answers + EOS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_inference.json")
    args = parser.parse_args()
    started = time.monotonic()
    result = header("cpu_inference")
    torch.set_num_threads(args.threads)
    threadpool_limits(limits=1, user_api="blas")  # numpy decodes streams single-threaded, as the worker

    loaded = load_model("llava-mini-shapes")
    quantizer = AlignedVQ.load(loaded.quantizer_path(DEFAULT_QUANTIZER))
    edge, cloud = split_llava(loaded.model, quantizer.config.site)
    encoder = EdgeEncoder(EdgeBundle.from_bytes(export_edge_bundle(loaded, quantizer)))
    freqs, ranking = encoder.bundle.freqs, encoder.bundle.ranking
    data = load_easy_vqa("test")
    n = max(args.batches)
    images = data.images[data.image_index[:n]]
    questions = data.questions[:n]
    streams = [encoder.encode_image(img) for img in images]
    edge_ms = timed(lambda: encoder.encode_image(images[0]), args.repeats * 10)

    runs = []
    for batch in args.batches:
        ids, mask = encode_prompts(loaded.tokenizer, loaded.prompt, questions[:batch])

        def cloud_half(batch=batch, ids=ids, mask=mask):
            decoded = [decode_stream(s, freqs, ranking) for s in streams[:batch]]
            indices = torch.from_numpy(np.stack([d.indices for d in decoded]).astype(np.int64))
            with torch.no_grad():
                hidden = quantizer.decode(indices)
                return cloud.generate(hidden, ids, mask, max_new_tokens=MAX_NEW_TOKENS)

        def unsplit(batch=batch, ids=ids, mask=mask):
            px = pixel_values(torch.from_numpy(images[:batch]), loaded.image_spec)
            with torch.no_grad():
                return loaded.model.generate(
                    input_ids=ids,
                    pixel_values=px,
                    attention_mask=mask,
                    max_new_tokens=MAX_NEW_TOKENS,
                    do_sample=False,
                )

        for name, fn in (("cloud_half_alignedvq", cloud_half), ("unsplit_hf_generate", unsplit)):
            ms = timed(fn, args.repeats)
            runs.append(
                {
                    "path": name,
                    "batch": batch,
                    "batch_ms_median": statistics.median(ms),
                    "ms_per_question": statistics.median(ms) / batch,
                    "samples_ms": ms,
                }
            )
    result |= {
        "model": "llava-mini-shapes",
        "quantizer": DEFAULT_QUANTIZER,
        "torch_threads": args.threads,
        "max_new_tokens": MAX_NEW_TOKENS,
        "edge_encode_ms_median": statistics.median(edge_ms),
        "edge_encode_ms": edge_ms,
        "runs": runs,
    }
    write_result(result, args.out, started)
    print(f"edge encode (numpy, 64 px image -> stream): {result['edge_encode_ms_median']:.2f} ms")
    print(f"{'path':>22} {'batch':>5} {'batch ms':>9} {'ms/question':>11}")
    for r in runs:
        print(f"{r['path']:>22} {r['batch']:>5} {r['batch_ms_median']:9.1f} {r['ms_per_question']:11.2f}")


if __name__ == "__main__":
    main()
