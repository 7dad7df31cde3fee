"""XLA compiler options per platform, for the programs whose best settings differ by platform.

XLA:CPU hands most matrix products to the YNNPACK library, which packs the weight operand
before multiplying. For large products (the image towers, the prefill) that pays off; for a
decode step's products (a few rows, the batch or the beams, against weights streamed from
memory) packing costs more than the product itself, and XLA's own kernels are faster. Measured
on one core (fp32; 24 products [M, 512] x [512, 1376] and a [M, 512] x [512, 32001] head):

    rows   YNNPACK (layers / head)   XLA's own (layers / head)
    1      3.4 / 2.0-2.2 ms          3.4-3.6 / 2.1-2.4 ms (one row never goes to YNNPACK)
    5-8    8.4-11.9 / 11.8-14.1 ms   7.2-8.1 / 8.9-9.7 ms
    300    9.5 ms (one layer pair)   11.9 ms

So on CPU the decode loop compiles as its own program with YNNPACK off (`decode_options`), and
everything else keeps XLA's defaults. Except with a tied head (OPT; LLaMA or T5 with
`tie_word_embeddings`): its kernel is the embedding table [V, D], read transposed, and XLA's own
kernels take that product with 8 rows 13x slower than YNNPACK (vocabulary 50272 x 512: 208 vs
15 ms per step); those decode loops keep the defaults too. Other platforms get no options.
"""
from __future__ import annotations

_CPU_DECODE = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no product goes to YNNPACK


def decode_options(platform: str, tied_head: bool = False) -> dict | None:
    """Compiler options for a decode loop's program on `platform` (None: XLA's defaults);
    `tied_head`: the LM's head is its embedding table (`jblip.families.tied_head`)."""
    return dict(_CPU_DECODE) if platform == "cpu" and not tied_head else None

