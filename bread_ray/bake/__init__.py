"""Stage 3: baking a prompt into a LoRA adapter on Ray Train with DeepSpeed ZeRO."""
