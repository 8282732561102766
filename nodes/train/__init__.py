"""LoRA training on kohya-style folders (`nodegraph train-lora`): dataset, adapters, trainer, saving."""
