"""Fine-tuning InstructBLIP / BLIP-2 (`jblip train`).

config (TrainConfig, recipes) -> build (params on the mesh, tokenizers, layout) -> data (JSONL,
images, labels) -> step (jitted loss/grad/AdamW on the mesh) -> loop (logs, evals, checkpoints,
export). One concept per module: trainable, optim, loss, head, state, checkpoint, evaluate,
synthetic (the demo / test dataset), vision_pretrain (the demo's stage 1), cli.
"""
